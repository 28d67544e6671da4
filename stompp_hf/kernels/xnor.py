"""Exact XNOR-popcount CPU kernel for a binary-input x binary-weight linear layer.

`xnor_linear(x, weight_packed, K, out_scale, bias)` computes, bit for bit, what the dense torch path computes::

    sx = where(x >= 0, 1, -1)                          # sign(0) = sign(-0.0) = +1, +-inf -> +-1
    sw = unpack_signs(weight_packed, K) * 2 - 1        # +-1, [N, K]
    y  = F.linear(sx, sw)                              # exact integers (|y| <= K < 2**24)
    y  = y * out_scale                                 # optional, one float32 rounding
    y  = y + bias                                      # optional, one float32 rounding

as `K - 2 * popcount(signs(x) ^ w)` over sign words, split over torch's own OpenMP threads (or the kernel's pthread
pool: `thread_runtime()`), on one of three code
paths chosen at run time from the CPU's features (`paths()`): "avx512" (AVX-512 VPOPCNTDQ + BW; weights in 16-row
panels, which `prepare_weights` builds once per weight), "avx2" (from `_SIMD_MIN_ROWS` rows on) and "scalar"
(`popcnt`; few rows, or any CPU). `path=` or `forced_path(...)` picks one (for tests and measurements). A NaN in `x`
has no sign: the kernel notices it while it packs the signs, and `xnor_linear` raises `ValueError` (the dense path
would count it as -1). The algorithm is described at the top of its C source, `xnor.c` next to this module (with
`xnor_avx512.c` and `xnor_conv.c`, the binary convolution of `stompp_hf.kernels.bconv`), which
`stompp_hf.kernels.build` compiles on first use with the system C compiler (`$CC`, else `cc`) into a private per-user
cache directory (`$STOMPP_HF_KERNEL_CACHE`, else under `$XDG_CACHE_HOME` or `~/.cache`) and loads with `ctypes`,
after checking the library's owner, mode and digest: no Python or torch headers. ctypes releases the GIL during a
call.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from .build import XnorUnavailable, load_library, unavailable

__all__ = [
    "PATHS",
    "InputNotBinary",
    "XnorUnavailable",
    "clock_ghz",
    "forced_path",
    "free_page_reporting",
    "is_available",
    "paths",
    "pack_signs",
    "popcount_probe",
    "popcount_rate",
    "prepare_weights",
    "set_hugepages",
    "set_stream_min_bytes",
    "thread_runtime",
    "xnor_linear",
]

_SOURCE = "xnor.c"
_SYMBOL = "xnor_linear_f32"

#: The kernel's code paths, fastest first: "avx512" (AVX-512 F/BW/DQ/VL + VPOPCNTDQ), "avx2", "scalar" (any CPU).
PATHS: tuple[str, ...] = ("avx512", "avx2", "scalar")
_PATH_IDS = {"scalar": 0, "avx2": 1, "avx512": 2}
_AUTO = -1
_NEVER = 2**63 - 1  # the C side's "never stream" (INT64_MAX)

#: Where a multi-threaded kernel call runs: "openmp", on the threads of the GNU OpenMP runtime (libgomp) that torch
#: itself uses, or "pthreads", on the kernel's own pool. "openmp" wherever torch runs on libgomp: between two torch
#: ops torch's threads spin, so a second pool would share cores with them (docs/design.md, "Threads").
#: `STOMPP_HF_KERNEL_THREADS=pthreads` forces the pool.
THREAD_RUNTIMES: tuple[str, ...] = ("openmp", "pthreads")
_THREADS_ENV = "STOMPP_HF_KERNEL_THREADS"
#: "1" / "0": the huge-page advice on the kernels' outputs on / off (`set_hugepages`), read when the library loads.
_HUGEPAGES_ENV = "STOMPP_HF_KERNEL_HUGEPAGES"
_GOMP_SYMBOLS = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads", "GOMP_barrier")

# Below this many (row, column, word) triples per thread, waking another thread costs more than it saves.
_MIN_WORK_PER_THREAD = 1 << 13

# From this many activation rows on, a call without prepared weights uses a SIMD path (which first copies the
# weights into its own layout); with fewer, the scalar path reads the packed weights in place.
_SIMD_MIN_ROWS = 10

_F32 = torch.float32
_U8 = torch.uint8
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F = ctypes.c_float
# The C entry points' status codes: 0 is success.
_RC_NO_MEMORY = 1
_RC_NAN = 2
_RC_NOT_PM1 = 3
_RC_NO_PATH = 4
_RC_BAD_ARGS = 5

# x, M, ldx, K, w, N, scale, bias, y, nthreads, min_work, simd_min_rows, path, prepared, strict, bf16
_ARGTYPES = (_P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _INT, _I64, _I64, _INT, _P, _INT, _INT)
# x, geometry, prepared, scale, bias, y, nchw_out, strict, nthreads, min_work, path, bf16
_CONV_ARGTYPES = (_P, _P, _P, _P, _P, _P, _INT, _INT, _INT, _I64, _INT, _INT)
#: Activation dtypes the kernels read and write: float32 on every path, bfloat16 on the avx512 and AMX ones.
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)


class InputNotBinary(ValueError):
    """`strict=True` and the input has a value other than -1 and +1 (NaN included): nothing was computed."""


class _Library(NamedTuple):
    linear: Callable[..., int]
    conv2d: Callable[..., int]
    signs_i8: Callable[..., int]
    pack_signs: Callable[..., int]
    epilogue_i32: Callable[..., int]
    prepared_bytes: Callable[..., int]
    prepare: Callable[..., int]
    paths: tuple[str, ...]
    openmp_in_use: Callable[[], int]
    set_hugepages: Callable[[int], int]
    set_stream_min_bytes: Callable[[int], int]
    amx_available: Callable[[], int]
    amx_weight_bytes: Callable[..., int]
    amx_prepare: Callable[..., int]
    amx_linear: Callable[..., int]
    amx_conv2d: Callable[..., int]
    ew_sign: Callable[..., int]
    ew_window_grad: Callable[..., int]
    ew_masked: Callable[..., int]
    ew_window_apply: Callable[..., int]
    ew_scale_bias: Callable[..., int]
    ew_row_sign: Callable[..., int]
    ew_clip_inplace: Callable[..., int]
    ew_clip_bits: Callable[..., int]
    ew_bits_grad: Callable[..., int]
    popcount_probe: Callable[[int], int]
    clock_probe: Callable[[int], int]


_lock = threading.Lock()
_lib: _Library | None = None
_kernel_fn: Callable[..., int] | None = None
_kernel_error: XnorUnavailable | None = None
_kernel_path: Path | None = None
_forced: str | None = None


def _bind(lib: ctypes.CDLL, name: str, argtypes: tuple, restype: type) -> Callable[..., int]:
    fn = getattr(lib, name)
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


def _openmp_symbols() -> tuple[int, ...] | None:
    """The addresses of `_GOMP_SYMBOLS` in the libgomp that torch has already loaded, or None: torch not on OpenMP,
    on another runtime (Intel's, LLVM's), or no such library in the process (never loads a second copy)."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        gomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        return tuple(ctypes.cast(getattr(gomp, name), ctypes.c_void_p).value for name in _GOMP_SYMBOLS)
    except (OSError, AttributeError):  # not loaded, not Linux / glibc, or a library without the GNU ABI
        return None


def _choose_threads(use_openmp: Callable[..., int]) -> None:
    """Hand the OpenMP runtime to the library (`xnor_use_openmp`) unless `STOMPP_HF_KERNEL_THREADS` says
    "pthreads" or there is none (then the library's own pool runs the threads)."""
    wanted = os.environ.get(_THREADS_ENV, "openmp").strip().lower() or "openmp"
    if wanted not in THREAD_RUNTIMES:
        warnings.warn(
            f"{_THREADS_ENV}={wanted!r} is not one of {', '.join(THREAD_RUNTIMES)}; using 'openmp' where torch "
            "runs on libgomp.",
            stacklevel=3,
        )
        wanted = "openmp"
    symbols = _openmp_symbols() if wanted == "openmp" else None
    use_openmp(*(symbols or (None,) * len(_GOMP_SYMBOLS)))


#: virtio device id of a memory balloon, and its feature bit for free page reporting (VIRTIO_BALLOON_F_REPORTING).
_VIRTIO_BALLOON, _BALLOON_F_REPORTING = "0x0005", 5


def free_page_reporting(root: str = "/sys/bus/virtio/devices") -> bool:
    """Whether this Linux machine is a VM whose virtio balloon reports free memory to the host (read from sysfs:
    a balloon device whose feature string has bit 5 set). There, free 2 MiB blocks are handed back to the host,
    and a huge page built from one faults back in from the host when it is first touched."""
    try:
        devices = sorted(os.listdir(root))
    except OSError:
        return False
    for name in devices:
        try:
            with open(os.path.join(root, name, "device"), encoding="ascii") as f:
                if f.read().strip() != _VIRTIO_BALLOON:
                    continue
            with open(os.path.join(root, name, "features"), encoding="ascii") as f:
                features = f.read().strip()
        except OSError:
            continue
        if len(features) > _BALLOON_F_REPORTING and features[_BALLOON_F_REPORTING] == "1":
            return True
    return False


def _hugepages_default() -> int:
    """`STOMPP_HF_KERNEL_HUGEPAGES` ("1" or "0") if set, else on unless the balloon reports free pages."""
    value = os.environ.get(_HUGEPAGES_ENV, "").strip()
    if value in ("0", "1"):
        return int(value)
    if value:
        warnings.warn(f"{_HUGEPAGES_ENV}={value!r} is not '0' or '1'; choosing from the machine.", stacklevel=4)
    return int(not free_page_reporting())


def set_hugepages(enabled: bool) -> bool:
    """Whether the kernels advise their large fresh outputs (2 MiB and up) as transparent huge pages (Linux). The
    advice turns thousands of 4 KiB page faults per call into a few; on a VM whose balloon reports free memory to
    the host (`free_page_reporting`), such a huge page can fault back in from the host, and calls stall. So the
    default, set when the library loads, is on except there, and `STOMPP_HF_KERNEL_HUGEPAGES=1` / `=0` overrides
    it. Only the page faults change, never a value. Returns the previous setting. Process-wide, not thread-local.

    Raises:
        XnorUnavailable: When the kernel could not be compiled or loaded.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be a bool, got {type(enabled).__name__}.")
    return bool(_library().set_hugepages(int(enabled)))


def _load() -> _Library:
    lib, path = load_library(_SOURCE, _SYMBOL)
    try:
        _choose_threads(_bind(lib, "xnor_use_openmp", (_P, _P, _P, _P), _INT))
        mask = _bind(lib, "xnor_paths", (), _INT)()
        bound = _Library(
            linear=_bind(lib, _SYMBOL, _ARGTYPES, _INT),
            conv2d=_bind(lib, "xnor_conv2d_f32", _CONV_ARGTYPES, _INT),
            signs_i8=_bind(lib, "xnor_signs_i8", (_P, _I64, _I64, _I64, _P), _INT),
            # x, rows, K, ldx, bf16, out
            pack_signs=_bind(lib, "xnor_pack_signs", (_P, _I64, _I64, _I64, _INT, _P), _INT),
            epilogue_i32=_bind(lib, "xnor_epilogue_i32", (_P, _I64, _I64, _P, _P, _P), _INT),
            prepared_bytes=_bind(lib, "xnor_prepared_bytes", (_I64, _I64, _I64, _I64), _I64),
            prepare=_bind(lib, "xnor_prepare_weights", (_P, _I64, _I64, _I64, _I64, _P), _INT),
            paths=tuple(p for p in PATHS if mask >> _PATH_IDS[p] & 1),
            openmp_in_use=_bind(lib, "xnor_openmp_in_use", (), _INT),
            popcount_probe=_bind(lib, "xnor_popcount_probe", (_I64,), _I64),
            clock_probe=_bind(lib, "xnor_clock_probe", (_I64,), _I64),
            set_hugepages=_bind(lib, "xnor_set_hugepages", (_INT,), _INT),
            set_stream_min_bytes=_bind(lib, "xnor_set_stream_min_bytes", (_I64,), _I64),
            amx_available=_bind(lib, "xnor_amx_available", (), _INT),
            amx_weight_bytes=_bind(lib, "xnor_amx_weight_bytes", (_I64, _I64, _I64), _I64),
            amx_prepare=_bind(lib, "xnor_amx_prepare", (_P, _I64, _I64, _I64, _P), _INT),
            # x, M, ldx, K, weight, N, scale, bias, y, nthreads, min_work, strict, bf16
            amx_linear=_bind(
                lib, "xnor_amx_linear_f32", (_P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _INT, _I64, _INT, _INT), _INT
            ),
            # x, geometry, weight, scale, bias, y, strict, nthreads, min_work, bf16
            amx_conv2d=_bind(lib, "xnor_amx_conv2d_f32", (_P, _P, _P, _P, _P, _P, _INT, _INT, _I64, _INT), _INT),
            # the fused training passes (stompp_hf.kernels.elementwise): x, out, n, dtype, out dtype, sum, nthreads
            ew_sign=_bind(lib, "xnor_ew_sign", (_P, _P, _I64, _INT, _INT, _P, _INT), _INT),
            # g, x, out, n, dtype (x, out), g's dtype, lo, hi, has_mult, mult, nthreads
            ew_window_grad=_bind(
                lib, "xnor_ew_window_grad", (_P, _P, _P, _I64, _INT, _INT, _F, _F, _INT, _F, _INT), _INT
            ),
            # x, mask, period, out, window, n, dtype, out dtype, a, b, lo, hi, nthreads
            ew_masked=_bind(
                lib, "xnor_ew_masked", (_P, _P, _I64, _P, _P, _I64, _INT, _INT, _F, _F, _F, _F, _INT), _INT
            ),
            # g, window, out, n, dtype (out), g's dtype, nthreads
            ew_window_apply=_bind(lib, "xnor_ew_window_apply", (_P, _P, _P, _I64, _INT, _INT, _INT), _INT),
            # y, rows, cols, dtype, scale, scale_len, bias, nthreads
            ew_scale_bias=_bind(lib, "xnor_ew_scale_bias", (_P, _I64, _I64, _INT, _P, _I64, _P, _INT), _INT),
            # x, scale, rows, cols, dtype, out dtype, out, nthreads
            ew_row_sign=_bind(lib, "xnor_ew_row_sign", (_P, _P, _I64, _I64, _INT, _INT, _P, _INT), _INT),
            # x, mask, n, dtype, b, nthreads
            ew_clip_inplace=_bind(lib, "xnor_ew_clip_inplace", (_P, _P, _I64, _INT, _F, _INT), _INT),
            # x, out, bits, n, dtype, out dtype, b, lo, hi, nthreads
            ew_clip_bits=_bind(lib, "xnor_ew_clip_bits", (_P, _P, _P, _I64, _INT, _INT, _F, _F, _F, _INT), _INT),
            # g, bits, out, n, dtype (out), g's dtype, nthreads
            ew_bits_grad=_bind(lib, "xnor_ew_bits_grad", (_P, _P, _P, _I64, _INT, _INT, _INT), _INT),
        )
        bound.set_hugepages(_hugepages_default())
    except AttributeError as e:  # a library of this name and digest that lacks an entry point: not ours
        raise unavailable(f"the library {path} lacks an entry point ({e})") from e
    global _kernel_path
    _kernel_path = path
    return bound


def _library() -> _Library:
    """The loaded C library, built on first use; raises the (cached) `XnorUnavailable` on failure."""
    global _lib, _kernel_fn, _kernel_error
    lib = _lib
    if lib is not None:
        return lib
    with _lock:
        if _lib is None:
            if _kernel_error is not None:
                raise _kernel_error
            try:
                _lib = _load()
            except XnorUnavailable as e:
                _kernel_error = e
                raise
            except Exception as e:  # anything else a build can throw still means "unavailable", never a crash
                _kernel_error = unavailable(f"building or loading failed unexpectedly ({e!r})")
                raise _kernel_error from e
            _kernel_fn = _lib.linear
        return _lib


def _kernel() -> Callable[..., int]:
    """The loaded linear entry point (see `_library`)."""
    return _library().linear


def _reset_for_tests() -> None:
    """Forget the loaded kernel and any cached failure, so that the next call builds or loads it again."""
    global _lib, _kernel_fn, _kernel_error, _kernel_path
    with _lock:
        _lib = None
        _kernel_fn = None
        _kernel_error = None
        _kernel_path = None


def is_available() -> bool:
    """Whether the XNOR kernel can be used here: builds and loads it on the first call, and never raises.

    Returns:
        True if the compiled kernel is loaded, False if compiling or loading it failed (the failure is remembered,
        and `xnor_linear` raises it as `XnorUnavailable`).
    """
    try:
        _library()
    except XnorUnavailable:
        return False
    return True


def paths() -> tuple[str, ...]:
    """The code paths this build and this CPU support, fastest first: a subset of `PATHS`, "scalar" always included.

    The C side decides from the CPU's own feature report (`cpuid`, as `__builtin_cpu_supports` reads it); the
    library itself is built for the host (`-march=native`), and its cache key includes `/proc/cpuinfo`'s flags.

    Raises:
        XnorUnavailable: When the kernel could not be compiled or loaded.
    """
    return _library().paths


def popcount_rate(steps: int = 1 << 18) -> float | None:
    """Binary multiply-adds per second that the fastest vector path's register tile reaches on the calling thread
    right now, with nothing else in the loop (no outer loops, no epilogue): on the avx512 path `steps` steps of its
    16 XOR-popcount-adds of 512 bits, registers only; on the avx2 path `steps` channel words (whole runs of 7) of
    the convolution's table tile (4 pixels x 64 channels x 32 bits a word: 8 nibble steps of 8 VPSHUFB lookups and
    8 byte adds) on operands in L1. A ceiling for the kernels' inner
    loop on this core at this moment (on a shared VM it moves with the host's load), for benchmarks; None where
    neither path runs.

    Raises:
        XnorUnavailable: When the kernel could not be compiled or loaded.
    """
    start = time.perf_counter()
    done = popcount_probe(steps)
    elapsed = time.perf_counter() - start
    return done / elapsed if done is not None else None


def popcount_probe(steps: int = 1 << 18) -> int | None:
    """Runs `popcount_rate`'s register loop for `steps` steps and returns the binary multiply-adds it did (the same
    for the same `steps` on the same path: what a caller that times the call itself divides by), or None where no
    vector path runs.

    Raises:
        XnorUnavailable: When the kernel could not be compiled or loaded.
    """
    _check_steps(steps)
    done = _library().popcount_probe(steps)
    return done if done >= 0 else None


def clock_ghz(steps: int = 1 << 26) -> float | None:
    """The clock the calling thread's core runs at right now, in GHz, from a timed chain of `steps` dependent 64-bit
    multiplies (3 cycles each on x86 cores since Intel Sandy Bridge and AMD Zen). For benchmarks: a VM's
    /proc/cpuinfo often reports a base clock below the turbo clock its cores run at, and a limit stated at that clock
    flatters whatever is measured against it. None on other architectures (no latency to count on there).

    Raises:
        TypeError: When `steps` is not a positive int.
        XnorUnavailable: When the kernel could not be compiled or loaded.
    """
    _check_steps(steps)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    probe = _library().clock_probe
    start = time.perf_counter()
    probe(steps)
    return 3 * steps / (time.perf_counter() - start) / 1e9


def _check_steps(steps: object) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise TypeError(f"`steps` must be a positive int, got {steps!r}.")


def thread_runtime() -> str:
    """Where multi-threaded kernel calls run (one of `THREAD_RUNTIMES`): "openmp" (torch's intra-op threads) or
    "pthreads" (the kernel's own pool). Chosen when the library loads (`STOMPP_HF_KERNEL_THREADS`); a forked child
    runs on the pool (an OpenMP team does not survive `fork`).

    Raises:
        XnorUnavailable: When the kernel could not be compiled or loaded.
    """
    return "openmp" if _library().openmp_in_use() else "pthreads"


@contextlib.contextmanager
def forced_path(path: str | None) -> Iterator[None]:
    """Run every kernel call that does not name a `path` on `path` ("avx512", "avx2" or "scalar"; None: choose)
    inside the block, packed layers included (convolutions too: they have the same three paths): for tests and
    measurements. Not thread-local."""
    global _forced
    if path is not None and path not in PATHS:
        raise ValueError(f"`path` must be one of {', '.join(map(repr, PATHS))} or None, but got {path!r}.")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous


def _path_id(path: str | None, kernel: str) -> int:
    """The C id of `path` (or of the forced one; -1 = let the kernel choose), checked against `paths()`."""
    path = path if path is not None else _forced
    if path is None:
        return _AUTO
    if path not in PATHS:
        raise ValueError(f"`path` must be one of {', '.join(map(repr, PATHS))} or None, but got {path!r}.")
    if path not in paths():
        raise ValueError(
            f"The {kernel} kernel's {path!r} path does not run on this CPU (it supports {', '.join(paths())})."
        )
    return _PATH_IDS[path]


def set_stream_min_bytes(min_bytes: int | None) -> int | None:
    """Outputs of at least `min_bytes` bytes are written with streaming (non-temporal) stores, by the avx512 and avx2
    linear paths, the avx512 convolution path, the avx2 convolution's table path (groups of whole 64-channel quads)
    and the AMX int8 path, where the layout allows it (64-byte aligned, rows of whole cache lines: a multiple of 16
    float32 or 32 bf16 channels; channels-last for a convolution). A normal
    store first reads the line it writes; streaming skips that read, about a third of the memory traffic of a layer
    whose input and output are the same size, and leaves the caches to the data still in use. An output too large to
    stay in L2 gains (22-35% less time, medians, on 384- and 768-wide linear layers at 4096 rows, float32, AMX Xeon); a
    small one would be read back from memory by the next op, hence the threshold. `None`: never stream. The default is
    4 MiB.
    Only the stores change, never a value. Returns the previous setting. Process-wide, not thread-local.

    Raises:
        XnorUnavailable: When the kernel could not be compiled or loaded.
    """
    if min_bytes is not None and (isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0):
        raise TypeError(f"`min_bytes` must be a non-negative int or None, got {min_bytes!r}.")
    previous = _library().set_stream_min_bytes(-1 if min_bytes is None else min_bytes)
    return None if previous == _NEVER else previous


def prepare_weights(
    weight_packed: torch.Tensor, out_features: int, in_per_group: int, taps: int = 1, groups: int = 1
) -> torch.Tensor:
    """The weights in the kernels' panel layout: 16 output channels per panel, one 32-bit word of each per step,
    plus the per-tap sums of sign(w) the convolution's padding correction needs.

    Built once per weight and kept by the packed modules (about the size of `weight_packed`); the avx512 linear path
    and every convolution use it.

    Args:
        weight_packed: Uint8 `[out_features, ceil(in_per_group * taps / 8)]` (`pack_signs` layout; for a conv, the
            weight `[O, Cg, kh, kw]` flattened per output channel).
        out_features: Output channels O.
        in_per_group: Inputs per output and tap: `in_features` for linear, `in_channels // groups` for a conv.
        taps: Kernel taps `kh * kw` (1 for linear).
        groups: Conv groups.

    Returns:
        A uint8 CPU tensor holding the layout, to pass as `prepared=`.
    """
    lib = _library()
    k = int(in_per_group) * int(taps)
    _check_packed(weight_packed, out_features, (k + 7) // 8, "prepare_weights")
    nbytes = lib.prepared_bytes(out_features, in_per_group, taps, groups)
    if nbytes < 0:
        raise ValueError(
            f"prepare_weights cannot lay out {out_features} outputs in {groups} groups of {in_per_group} inputs "
            f"x {taps} taps."
        )
    out = torch.empty(nbytes, dtype=_U8)
    lib.prepare(weight_packed.contiguous().data_ptr(), out_features, in_per_group, taps, groups, out.data_ptr())
    return out


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """`stompp_hf.core.packing.pack_signs(x >= 0)` in one C pass: the signs of a float32 or bfloat16 CPU tensor
    `[rows, K]` as uint8 `[rows, ceil(K / 8)]`, a set bit for `x >= 0` (+-0 give +1, NaN -1, as `binary_sign`).

    Raises:
        ValueError: On another dtype, device or number of dimensions.
        XnorUnavailable: When the kernel could not be compiled or loaded.
    """
    lib = _library()
    if not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES or not x.is_cpu or x.ndim != 2:
        raise ValueError(f"pack_signs expects a 2-D float32 or bfloat16 CPU tensor, got {_describe(x)}.")
    rows, k = x.shape
    if (k > 1 and x.stride(1) != 1) or (rows > 1 and x.stride(0) < k):
        x = x.contiguous()
    out = torch.empty((rows, (k + 7) // 8), dtype=_U8)
    if rows and k:
        ldx = x.stride(0) if rows > 1 else k
        rc = lib.pack_signs(x.data_ptr(), rows, k, ldx, int(x.dtype is torch.bfloat16), out.data_ptr())
        _raise_for(rc, "pack_signs", x)
    return out


def xnor_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    in_features: int,
    out_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    num_threads: int | None = None,
    *,
    path: str | None = None,
    prepared: torch.Tensor | None = None,
    strict: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary-input x binary-weight linear layer with XNOR and popcount, bit-identical to the dense torch path.

    Each input entry counts as +1 if it is `>= 0` (so `0.0` and `-0.0` give +1) and as -1 otherwise; a NaN entry
    is an error.
    The output is `y = (sign(x) @ sign(W).T) * out_scale + bias`, where the integer dot product is exact, and the
    multiply and the add are two separate float32 roundings, as in torch. A bfloat16 `x` gives a bfloat16 `y`,
    rounded as torch's bf16 path rounds it: the integer (the bf16 matmul's output), then the product, then the sum,
    each to the nearest bfloat16 (pass `out_scale` and `bias` as float32 holding the bf16 values a bf16 model uses).
    Inference only: no autograd graph.

    Args:
        x: Float32 or bfloat16 (avx512 path only) CPU tensor `[..., in_features]`, any leading dimensions (rows need
            unit stride, else a copy).
        weight_packed: Uint8 CPU tensor `[N, ceil(in_features / 8)]` in `stompp_hf.core.packing.pack_signs`
            layout: entry `k` of a row is bit `k % 8` (least significant first) of byte `k // 8`, a set bit meaning
            +1. Bits past `in_features` in the last byte are ignored.
        in_features: The number of input features `K` (any positive int). Exactness holds for `K < 2**24`.
        out_scale: Optional float32 CPU tensor `[N]`, multiplied into the integer dot products.
        bias: Optional float32 CPU tensor `[N]`, added last.
        num_threads: Threads to use (default `torch.get_num_threads()`); small problems use fewer.
        path: "avx512", "avx2" or "scalar" to force a code path (it must be in `paths()`); default: the fastest for
            the CPU and the problem (see the module docstring).
        prepared: `prepare_weights(weight_packed, N, in_features)`, which spares the avx512 path rebuilding its
            weight panels on every call.
        strict: The inputs are already +-1 (a binary activation's output): any other value raises `InputNotBinary`.
        out: A contiguous CPU tensor `[..., N]` of `x`'s dtype, in no storage shared with `x`, to write the output
            into instead of a new tensor (a caller that reuses one buffer call after call spares the page faults of
            a fresh output; its contents are unspecified after an error).

    Returns:
        Tensor `[..., N]` of `x`'s dtype: `out` where given.

    Raises:
        ValueError: On a wrong dtype, device or shape, when `x` has a NaN value, when `path` does not run on this
            CPU (or, for bfloat16, is not the avx512 path), or when grad mode is on and `x`, `out_scale` or `bias`
            requires grad (the kernel has no backward pass).
        InputNotBinary: With `strict`, when `x` has a value other than +-1.
        XnorUnavailable: When the kernel could not be compiled or loaded.
        MemoryError: When the kernel's scratch buffers (packed activations, a weight copy) cannot be allocated.
    """
    fn = _kernel_fn or _kernel()
    k = int(in_features)
    if not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES or not x.is_cpu:
        raise ValueError(f"xnor_linear expects x as a float32 or bfloat16 CPU tensor, got {_describe(x)}.")
    if x.ndim == 0 or x.shape[-1] != k or k <= 0:
        raise ValueError(
            f"xnor_linear expects x of shape [..., {k}] (in_features={k}, positive), got {tuple(x.shape)}."
        )
    if (
        not isinstance(weight_packed, torch.Tensor)
        or weight_packed.dtype is not _U8
        or not weight_packed.is_cpu
        or weight_packed.ndim != 2
        or weight_packed.shape[1] != (k + 7) // 8
    ):
        raise ValueError(
            f"xnor_linear expects weight_packed as a uint8 CPU tensor [N, {(k + 7) // 8}] for in_features={k}, "
            f"got {_describe(weight_packed)}."
        )
    n = weight_packed.shape[0]
    out_scale, scale_ptr = _vector_pointer("out_scale", out_scale, n, "xnor_linear")
    bias, bias_ptr = _vector_pointer("bias", bias, n, "xnor_linear")
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, out_scale, bias))
    if grad:
        raise ValueError(
            "The XNOR kernel is inference-only (no autograd): call it under torch.no_grad() or "
            "torch.inference_mode(), or with tensors that do not require grad."
        )
    num_threads = _threads(num_threads, "xnor_linear")
    path_id = _path_id(path, "XNOR")
    prepared_ptr = None
    if prepared is not None:
        _check_prepared(prepared, n, k, 1, 1)
        prepared_ptr = prepared.data_ptr()
    if not weight_packed.is_contiguous():
        weight_packed = weight_packed.contiguous()

    x2 = x if x.ndim == 2 else x.reshape(-1, k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype) if out is None else _check_out(out, x, n, "xnor_linear").view(m, n)
    if m and n:
        rc = fn(
            x2.data_ptr(),
            m,
            x2.stride(0),
            k,
            weight_packed.data_ptr(),
            n,
            scale_ptr,
            bias_ptr,
            y.data_ptr(),
            num_threads,
            _MIN_WORK_PER_THREAD,
            _SIMD_MIN_ROWS,
            path_id,
            prepared_ptr,
            int(strict),
            int(x.dtype is torch.bfloat16),
        )
        _raise_for(rc, "xnor_linear", x)
    if out is not None:
        return out
    return y if x.ndim == 2 else y.view(*x.shape[:-1], n)


def _check_out(out: object, x: torch.Tensor, n: int, caller: str) -> torch.Tensor:
    """`out` if it can take the output `[..., n]` of `x`: same dtype, CPU, contiguous, in a storage of its own."""
    shape = (*x.shape[:-1], n)
    if not isinstance(out, torch.Tensor) or out.dtype != x.dtype or not out.is_cpu or tuple(out.shape) != shape:
        raise ValueError(f"{caller} expects `out` as a {x.dtype} CPU tensor of shape {shape}, got {_describe(out)}.")
    if not out.is_contiguous():
        raise ValueError(f"{caller} expects a contiguous `out`.")
    if out.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise ValueError(f"{caller}: `out` shares its storage with `x`.")
    if torch.is_grad_enabled() and out.requires_grad:
        raise ValueError(f"{caller}: `out` requires grad, and the kernel has no backward pass.")
    return out


def _check_packed(weight_packed: object, rows: int, nbytes: int, caller: str) -> None:
    """Raise unless `weight_packed` is a uint8 CPU tensor `[rows, nbytes]` (packed signs, `pack_signs` layout)."""
    if (
        not isinstance(weight_packed, torch.Tensor)
        or weight_packed.dtype is not _U8
        or not weight_packed.is_cpu
        or tuple(weight_packed.shape) != (rows, nbytes)
    ):
        raise ValueError(
            f"{caller} expects weight_packed as a uint8 CPU tensor [{rows}, {nbytes}], got {_describe(weight_packed)}."
        )


def _threads(num_threads: int | None, name: str) -> int:
    if num_threads is None:
        return torch.get_num_threads()
    if num_threads < 1:
        raise ValueError(f"{name} expects num_threads >= 1, got {num_threads}.")
    return num_threads


def _check_prepared(prepared: object, n: int, in_per_group: int, taps: int, groups: int) -> None:
    nbytes = _library().prepared_bytes(n, in_per_group, taps, groups)
    if (
        not isinstance(prepared, torch.Tensor)
        or prepared.dtype is not _U8
        or not prepared.is_cpu
        or prepared.shape != (nbytes,)
        or not prepared.is_contiguous()
    ):
        raise ValueError(
            f"`prepared` must be prepare_weights' uint8 CPU tensor of {nbytes} bytes for this weight, got "
            f"{_describe(prepared)}."
        )


def _raise_for(rc: int, name: str, x: torch.Tensor) -> None:
    """Raise what the kernel's status code `rc` means (nothing for 0)."""
    if rc == 0:
        return
    if rc == _RC_NAN:
        raise ValueError(
            f"{name} got an input x of shape {tuple(x.shape)} with NaN values, which have no sign: "
            "the layers before this one produced NaN (e.g. a diverged model or an invalid input)."
        )
    if rc == _RC_NOT_PM1:
        raise InputNotBinary(f"{name} was told its input is +-1 (strict=True), but x has other values.")
    if rc == _RC_NO_MEMORY:
        raise MemoryError(f"{name} could not allocate its scratch memory.")
    if rc == _RC_NO_PATH:
        raise ValueError(
            f"{name}: the requested code path does not run on this CPU (it supports {paths()}), or not for "
            f"{x.dtype} inputs (bfloat16 needs the avx512 or AMX path)."
        )
    raise ValueError(f"{name}: the kernel rejected the arguments (status {rc}).")


def _vector_pointer(name: str, t: object | None, n: int, fn: str) -> tuple[torch.Tensor | None, int | None]:
    """An optional float32 `[n]` argument checked (`_check_vector`) and its data pointer; `(None, None)` for None."""
    if t is None:
        return None, None
    t = _check_vector(name, t, n, fn)
    return t, t.data_ptr()


def _check_vector(name: str, t: object, n: int, fn: str = "xnor_linear") -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype is not _F32 or not t.is_cpu or t.shape != (n,):
        raise ValueError(f"{fn} expects {name} as a float32 CPU tensor [{n}], got {_describe(t)}.")
    return t if t.stride(0) == 1 else t.contiguous()


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} on {t.device} of shape {tuple(t.shape)}"
    return type(t).__name__
