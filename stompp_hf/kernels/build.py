"""Compile the C kernels shipped with the package on first use, cache the libraries, and load them with `ctypes`.

A kernel is one C file next to this module (package data, read with `importlib.resources`), plus the sibling C files
it pulls in with `#include "name.c"` lines, which `read_source` expands in place (with `#line` markers), so the text
that is hashed is exactly the text that is compiled. It is compiled with the
system C compiler (`$CC`, else `cc`, split like a shell command line so `CC="ccache gcc"` works) and `CFLAGS` into
a per-user cache directory: `$STOMPP_HF_KERNEL_CACHE` if set, else `$XDG_CACHE_HOME/stompp_hf/kernels` (default
`~/.cache/stompp_hf/kernels`). The library's name hashes the source, the flags, the compiler command and the host
CPU's feature flags (`-march=native` code only runs on such a CPU), so any change builds a new one. Compiler warnings
are not shown unless the build fails (then the compiler's output is part of the error message).

Loading a library runs its code (constructors included) in this process, so nothing is loaded that someone else
could have written, or that is not whole:

* The cache directory must be owned by this user and not writable by group or others; missing directories (parents
  too) are created with mode 0o700. An unsafe directory is stepped around, with one warning that names it and why:
  `$STOMPP_HF_KERNEL_CACHE` to the default location, the default location to `<tempdir>/stompp_hf-kernels-<uid>`.
  If none of them is safe the kernel is unavailable (`XnorUnavailable`).
* A cached library must be a regular file (opened with `O_NOFOLLOW`: not a symlink), owned by this user, not
  writable by group or others, and end with the SHA-256 digest of the rest of it, which the build appends (so one
  rename publishes a library and its digest together; ELF loaders ignore trailing bytes). The whole file is read and
  checked before `dlopen` (about 50 us for the ~60 KB library, once per process), so a planted, truncated or
  corrupt file is never mapped: it is rebuilt and replaced, and its code never runs here. A cached library that
  passes the checks but does not load (or lacks the symbol) is rebuilt once; a failure after that is raised.
* A build writes a temporary file (mode 0o700), appends the digest, fsyncs it and loads it, so a build that does not
  load is never published; then it renames it into place and fsyncs the directory. Concurrent builders each publish
  a complete library, and a failed build leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib.resources
import logging
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from .cpu import cpu_flags

__all__ = [
    "CFLAGS",
    "XnorUnavailable",
    "cache_dir",
    "compiler",
    "library_path",
    "load_kernel",
    "load_library",
    "private_cache_dir",
    "read_source",
]

logger = logging.getLogger(__name__)

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

# A built library ends with these bytes and the SHA-256 digest of everything before them.
_DIGEST_TAG = b"stompp_hf-sha256"
_TRAILER_BYTES = len(_DIGEST_TAG) + hashlib.sha256().digest_size

_FIX_COMPILER = (
    "To fix it, install a C compiler (gcc or clang) or point the CC environment variable at one, "
    "or use the reference (dense torch) mode instead of the XNOR kernel."
)
_FIX_CACHE = (
    "To fix it, point STOMPP_HF_KERNEL_CACHE at a directory that you own and that only you can write "
    "(chmod 700), or use the reference (dense torch) mode instead of the XNOR kernel."
)


class XnorUnavailable(RuntimeError):
    """The XNOR kernel could not be compiled or loaded (no C compiler, a failed build, an unwritable cache)."""


def unavailable(
    what: str, cmd: Sequence[str] | None = None, stderr: str = "", fix: str = _FIX_COMPILER
) -> XnorUnavailable:
    """The error for a kernel that cannot be built or loaded: what went wrong, the command, the compiler's output,
    and how to fix it."""
    parts = [f"The stompp_hf XNOR kernel is unavailable: {what}."]
    if cmd:
        parts.append(f"Compiler command: {shlex.join(cmd)}")
    tail = stderr.strip()[-2000:]
    if tail:
        parts.append(f"Compiler output (tail):\n{tail}")
    parts.append(fix)
    return XnorUnavailable("\n".join(parts))


def cache_dir() -> Path:
    """The configured kernel cache: `$STOMPP_HF_KERNEL_CACHE`, else `$XDG_CACHE_HOME` (or `~/.cache`)/stompp_hf/
    kernels. Kernels go there only if it is private to this user (`private_cache_dir`)."""
    explicit = os.environ.get("STOMPP_HF_KERNEL_CACHE")
    return Path(explicit) if explicit else _default_cache_dir()


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stompp_hf" / "kernels"


def private_cache_dir() -> Path:
    """The directory kernels are built into and loaded from: `cache_dir()` if it is private to this user, else the
    first private one of the default location and `<tempdir>/stompp_hf-kernels-<uid>`, with one warning.

    Private means owned by this user and not writable by group or others. Missing directories, and their missing
    parents, are created with mode 0o700; an existing one's mode is left as it is.

    Returns:
        The absolute path of the directory.

    Raises:
        XnorUnavailable: When none of the candidates is private (or can be created).
    """
    fallback = Path(tempfile.gettempdir()) / f"stompp_hf-kernels-{os.getuid()}"
    rejected: list[str] = []
    for candidate in dict.fromkeys(Path(os.path.abspath(d)) for d in (cache_dir(), _default_cache_dir(), fallback)):
        problem = _directory_problem(candidate)
        if problem is None:
            if rejected:
                warnings.warn(
                    f"stompp_hf does not use the kernel cache {' or '.join(rejected)}: another user could put a "
                    f"library there, and it would run inside this process. Using {candidate} instead. "
                    "Make the directory yours and writable only by you (chmod go-w), or point "
                    "STOMPP_HF_KERNEL_CACHE elsewhere.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return candidate
        rejected.append(f"{candidate} ({problem})")
    raise unavailable(f"no kernel cache directory is private to this user: {'; '.join(rejected)}", fix=_FIX_CACHE)


def _directory_problem(path: Path) -> str | None:
    """Why `path` cannot hold kernels (it is created, mode 0o700, if missing), or None if it can."""
    missing = [d for d in (path, *path.parents) if not d.exists()]
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:  # made by a concurrent process meanwhile: checked below like any other
                pass
        st = os.stat(path)
    except OSError as e:
        return f"it cannot be created or read: {e}"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    return _ownership_problem(st)


def _ownership_problem(st: os.stat_result) -> str | None:
    """Why a file or directory with status `st` could have been written by someone else, or None."""
    uid = os.getuid()
    if st.st_uid != uid:
        return f"it is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):#o})"
    return None


def compiler() -> list[str]:
    """The C compiler command, `$CC` (split like a shell would) or `cc`; empty if `CC` is set to blanks."""
    return shlex.split(os.environ.get("CC") or "cc")


# A line that pulls a sibling C file of this package into the translation unit: `#include "xnor_conv.c"`.
_LOCAL_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.c)"[ \t]*$', re.MULTILINE)


def _read_one(name: str) -> str:
    try:
        return importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    except (OSError, ModuleNotFoundError, TypeError):
        pass
    try:  # e.g. a loader without resource support: the file next to this module
        return Path(__file__).with_name(name).read_text(encoding="utf-8")
    except OSError as e:
        raise unavailable(f"its C source {name} is missing from the stompp_hf installation ({e})") from e


def read_source(name: str, _seen: tuple[str, ...] = ()) -> str:
    """The text of the kernel source `name` (e.g. "xnor.c") shipped in this package, with every
    `#include "<sibling>.c"` line replaced by that file's text (recursively), between `#line` markers so that
    compiler messages name the right file and line."""
    if name in _seen:
        raise unavailable(f"its C sources include each other in a cycle ({' -> '.join((*_seen, name))})")
    text = _read_one(name)
    parts: list[str] = []
    end = 0
    for match in _LOCAL_INCLUDE.finditer(text):
        parts.append(text[end : match.start()])
        after = text.count("\n", 0, match.end()) + 2  # the line below the #include
        body = read_source(match.group(1), (*_seen, name))
        parts.append(f'#line 1 "{match.group(1)}"\n{body}\n#line {after} "{name}"')
        end = match.end()
    parts.append(text[end:])
    return "".join(parts)


def _cpu_tag() -> str:
    flags = cpu_flags()
    return " ".join(sorted(flags)) if flags else platform.processor()


def library_path(name: str, source: str, cc: Sequence[str], directory: Path | None = None) -> Path:
    """The cached library for kernel `name` built from `source` with the (resolved) compiler command `cc`, in
    `directory` (default `cache_dir()`)."""
    key = "\0".join([source, *CFLAGS, *cc, platform.machine(), _cpu_tag()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return (cache_dir() if directory is None else directory) / f"{name}_{digest}.so"


def _resolved_compiler() -> list[str]:
    cc = compiler()
    if not cc:
        raise unavailable("the CC environment variable is empty")
    resolved = shutil.which(cc[0])
    if resolved is None:
        raise unavailable(f"C compiler {cc[0]!r} was not found", cc + list(CFLAGS))
    return [resolved, *cc[1:]]


def _library_problem(path: Path) -> str | None:
    """Why the cached library `path` must not be loaded (missing, maybe not written by us, not whole), or None."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a planted FIFO cannot block
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return "it is missing"
    except OSError as e:
        return "it is a symbolic link" if e.errno == errno.ELOOP else f"it cannot be opened ({e})"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "it is not a regular file"
        problem = _ownership_problem(st)
        if problem:
            return problem
        data = memoryview(f.read())
    body, tag, digest = data[:-_TRAILER_BYTES], data[-_TRAILER_BYTES:-32], data[-32:]
    if len(data) <= _TRAILER_BYTES or tag != _DIGEST_TAG or hashlib.sha256(body).digest() != digest:
        return "its SHA-256 digest is missing or wrong (truncated, corrupt, or not built by stompp_hf)"
    return None


def _seal(path: str) -> None:
    """Make the library just built at `path` private, append the SHA-256 digest of its bytes, and fsync it."""
    os.chmod(path, 0o700)
    with open(path, "r+b") as f:
        digest = hashlib.sha256(f.read()).digest()
        f.write(_DIGEST_TAG + digest)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush a rename in directory `path` to disk, where the platform and file system allow it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. file systems that cannot sync a directory
        pass
    finally:
        os.close(fd)


def _build(source_name: str, source: str, cc: list[str], path: Path, symbol: str) -> ctypes.CDLL:
    """Compile `source` into `path` and return the loaded library, checked to export `symbol`: a temporary file in
    the same directory is sealed (`_seal`) and loaded, then renamed into place, so only a library that loads is ever
    published."""
    cache = path.parent
    cmd = [*cc, *CFLAGS, "-x", "c", "-", "-o"]
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".so.tmp", dir=cache)
        os.close(fd)
    except OSError as e:
        raise unavailable(f"cannot write the kernel cache directory {cache} ({e})", fix=_FIX_CACHE) from e
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
        try:
            _seal(tmp)
        except OSError as e:
            raise unavailable(f"cannot write the kernel cache directory {cache} ({e})", fix=_FIX_CACHE) from e
        # Loaded under its temporary (unique) name, so the loader cannot hand back an older library of this path.
        try:
            lib = ctypes.CDLL(tmp)
            getattr(lib, symbol)
        except (OSError, AttributeError) as e:
            raise unavailable(f"the freshly built kernel does not load ({e})", [*cmd, tmp]) from e
        try:
            os.replace(tmp, path)  # atomic: concurrent builders each publish a complete library
        except OSError as e:
            raise unavailable(f"cannot write the kernel cache directory {cache} ({e})", fix=_FIX_CACHE) from e
        _fsync_dir(cache)
        return lib
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(source_name: str, symbol: str) -> tuple[ctypes.CDLL, Path]:
    """Load the library of `source_name` from the private cache (building it if it is missing, or replacing it if it
    fails the checks, does not load or lacks `symbol`) and return it with its path; bind its functions with
    `getattr(library, name)` and set their `argtypes` / `restype`.

    Raises:
        XnorUnavailable: No compiler, a failed build, no private or writable cache, or a library that does not load
            even when freshly built.
    """
    source = read_source(source_name)
    cc = _resolved_compiler()
    path = library_path(Path(source_name).stem, source, cc, private_cache_dir())
    problem = _library_problem(path)
    lib = None
    if problem is None:
        try:
            lib = ctypes.CDLL(str(path))
            getattr(lib, symbol)
        except (OSError, AttributeError) as e:
            lib, problem = None, f"it does not load ({e})"
    if lib is None:
        logger.info("Building the kernel library %s: %s.", path, problem)
        lib = _build(source_name, source, cc, path, symbol)
    return lib, path


def load_kernel(
    source_name: str, symbol: str, argtypes: Sequence[type], restype: type | None
) -> tuple[Callable[..., int], Path]:
    """`load_library`, then its function `symbol` with `argtypes` and `restype` set, and the library's path.

    Raises:
        XnorUnavailable: As `load_library`.
    """
    lib, path = load_library(source_name, symbol)
    fn = getattr(lib, symbol)
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn, path
