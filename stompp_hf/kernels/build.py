"""Compile the C kernels shipped with the package on first use, cache the libraries, and load them with `ctypes`.

A kernel is one C file next to this module (package data, read with `importlib.resources`). It is compiled with the
system C compiler (`$CC`, else `cc`, split like a shell command line so `CC="ccache gcc"` works) and `CFLAGS` into
a per-user cache directory: `$STOMPP_HF_KERNEL_CACHE` if set, else `$XDG_CACHE_HOME/stompp_hf/kernels` (default
`~/.cache/stompp_hf/kernels`). The library's name hashes the source, the flags, the compiler command and the host
CPU's feature flags (`-march=native` code only runs on such a CPU), so any change builds a new one; a build writes a
temporary file and renames it into place, so concurrent builders each publish a complete library and a failed build
leaves nothing behind. Compiler warnings are not shown unless the build fails (then the compiler's output is part
of the error message).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .cpu import cpu_flags

__all__ = ["CFLAGS", "XnorUnavailable", "cache_dir", "compiler", "library_path", "load_kernel", "read_source"]

#: Flags for every kernel build. `-ffp-contract=off` is load-bearing: no fused multiply-add, so the epilogue rounds
#: like torch. `-Wall -Wextra` only matter for the message of a failed build (the sources compile without warnings).
CFLAGS: tuple[str, ...] = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fPIC",
    "-shared",
    "-pthread",
    "-Wall",
    "-Wextra",
)

_BUILD_TIMEOUT_S = 300


class XnorUnavailable(RuntimeError):
    """The XNOR kernel could not be compiled or loaded (no C compiler, a failed build, an unwritable cache)."""


def unavailable(what: str, cmd: Sequence[str] | None = None, stderr: str = "") -> XnorUnavailable:
    """The error for a kernel that cannot be built or loaded: what went wrong, the command, the compiler's output."""
    parts = [f"The stompp_hf XNOR kernel is unavailable: {what}."]
    if cmd:
        parts.append(f"Compiler command: {shlex.join(cmd)}")
    tail = stderr.strip()[-2000:]
    if tail:
        parts.append(f"Compiler output (tail):\n{tail}")
    parts.append(
        "To fix it, install a C compiler (gcc or clang) or point the CC environment variable at one, "
        "or use the reference (dense torch) mode instead of the XNOR kernel."
    )
    return XnorUnavailable("\n".join(parts))


def cache_dir() -> Path:
    """Where built kernels go: `$STOMPP_HF_KERNEL_CACHE`, else `$XDG_CACHE_HOME` (or `~/.cache`)/stompp_hf/kernels."""
    explicit = os.environ.get("STOMPP_HF_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stompp_hf" / "kernels"


def compiler() -> list[str]:
    """The C compiler command, `$CC` (split like a shell would) or `cc`; empty if `CC` is set to blanks."""
    return shlex.split(os.environ.get("CC") or "cc")


def read_source(name: str) -> str:
    """The text of the kernel source `name` (e.g. "xnor.c") shipped in this package."""
    try:
        return importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    except (OSError, ModuleNotFoundError, TypeError):
        pass
    try:  # e.g. a loader without resource support: the file next to this module
        return Path(__file__).with_name(name).read_text(encoding="utf-8")
    except OSError as e:
        raise unavailable(f"its C source {name} is missing from the stompp_hf installation ({e})") from e


def _cpu_tag() -> str:
    flags = cpu_flags()
    return " ".join(sorted(flags)) if flags else platform.processor()


def library_path(name: str, source: str, cc: Sequence[str]) -> Path:
    """The cached library for kernel `name` built from `source` with the (resolved) compiler command `cc`."""
    key = "\0".join([source, *CFLAGS, *cc, platform.machine(), _cpu_tag()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / f"{name}_{digest}.so"


def _resolved_compiler() -> list[str]:
    cc = compiler()
    if not cc:
        raise unavailable("the CC environment variable is empty")
    resolved = shutil.which(cc[0])
    if resolved is None:
        raise unavailable(f"C compiler {cc[0]!r} was not found", cc + list(CFLAGS))
    return [resolved, *cc[1:]]


def _compile(source_name: str, source: str, cc: list[str], path: Path) -> None:
    """Compile `source` into `path`, atomically: a temporary file in the same directory, then a rename."""
    cache = path.parent
    cmd = [*cc, *CFLAGS, "-x", "c", "-", "-o"]
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".so.tmp", dir=cache)
        os.close(fd)
    except OSError as e:
        raise unavailable(f"cannot write the kernel cache directory {cache} ({e})") from e
    # The source goes in on stdin (exactly the text that was hashed); `#line` makes diagnostics name the file.
    text = f'#line 1 "{source_name}"\n{source}'
    try:
        try:
            proc = subprocess.run(
                [*cmd, tmp], input=text, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise unavailable(f"running the C compiler failed ({e})", [*cmd, tmp]) from e
        if proc.returncode != 0:
            raise unavailable(
                f"the C compiler exited with status {proc.returncode}", [*cmd, tmp], proc.stderr + proc.stdout
            )
        os.replace(tmp, path)  # atomic: concurrent builders each publish a complete library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_kernel(
    source_name: str, symbol: str, argtypes: Sequence[type], restype: type | None
) -> tuple[Callable[..., int], Path]:
    """Build (or reuse from the cache) the library of `source_name` and return its function `symbol` and its path.

    Raises:
        XnorUnavailable: No compiler, a failed build, an unwritable cache, or a library that does not load.
    """
    source = read_source(source_name)
    cc = _resolved_compiler()
    path = library_path(Path(source_name).stem, source, cc)
    if not path.exists():
        _compile(source_name, source, cc, path)
    try:
        lib = ctypes.CDLL(str(path))
        fn = getattr(lib, symbol)
    except (OSError, AttributeError) as e:
        raise unavailable(f"loading the compiled kernel {path} failed ({e}); delete it to force a rebuild") from e
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn, path
