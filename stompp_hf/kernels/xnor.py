"""Exact XNOR-popcount CPU kernel for a binary-input x binary-weight linear layer.

`xnor_linear(x, weight_packed, K, out_scale, bias)` computes, bit for bit, what the dense torch path computes::

    sx = where(x >= 0, 1, -1)                          # sign(0) = sign(-0.0) = +1, +-inf -> +-1
    sw = unpack_signs(weight_packed, K) * 2 - 1        # +-1, [N, K]
    y  = F.linear(sx, sw)                              # exact integers (|y| <= K < 2**24)
    y  = y * out_scale                                 # optional, one float32 rounding
    y  = y + bias                                      # optional, one float32 rounding

as `K - 2 * popcount(signs(x) ^ w)` over 64-bit sign words, with a scalar `popcnt` path for few rows (batch-1
inference) and an AVX2 path from `_SIMD_MIN_ROWS` rows on, split over a process-wide pthread pool. A NaN in `x` has
no sign: the kernel notices it while it packs the signs, and `xnor_linear` raises `ValueError` (the dense path would
count it as -1). The algorithm is described at the top of its C source, `xnor.c` next to this module, which
`stompp_hf.kernels.build` compiles on first use with the system C compiler (`$CC`, else `cc`) into a private per-user
cache directory (`$STOMPP_HF_KERNEL_CACHE`, else under `$XDG_CACHE_HOME` or `~/.cache`) and loads with `ctypes`,
after checking the library's owner, mode and digest: no Python or torch headers. ctypes releases the GIL during a
call.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .build import XnorUnavailable, load_kernel, unavailable

__all__ = ["XnorUnavailable", "is_available", "xnor_linear"]

_SOURCE = "xnor.c"
_SYMBOL = "xnor_linear_f32"

# Below this many (row, column, word) triples per thread, waking another thread costs more than it saves.
_MIN_WORK_PER_THREAD = 1 << 13

# From this many activation rows on, the AVX2 path (which first copies the weights into nibble planes) is used.
_SIMD_MIN_ROWS = 10

_F32 = torch.float32
_U8 = torch.uint8
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
# The C entry point's status codes: 0 is success.
_RC_NO_MEMORY = 1
_RC_NAN = 2

# x, M, ldx, K, w, N, scale, bias, y, nthreads, min_work, simd_min_rows
_ARGTYPES = (_P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, ctypes.c_int, _I64, _I64)

_lock = threading.Lock()
_kernel_fn: Callable[..., int] | None = None
_kernel_error: XnorUnavailable | None = None
_kernel_path: Path | None = None


def _kernel() -> Callable[..., int]:
    """The loaded C entry point, built on first use; raises the (cached) `XnorUnavailable` on failure."""
    global _kernel_fn, _kernel_error, _kernel_path
    fn = _kernel_fn
    if fn is not None:
        return fn
    with _lock:
        if _kernel_fn is None:
            if _kernel_error is not None:
                raise _kernel_error
            try:
                _kernel_fn, _kernel_path = load_kernel(_SOURCE, _SYMBOL, _ARGTYPES, ctypes.c_int)
            except XnorUnavailable as e:
                _kernel_error = e
                raise
            except Exception as e:  # anything else a build can throw still means "unavailable", never a crash
                _kernel_error = unavailable(f"building or loading failed unexpectedly ({e!r})")
                raise _kernel_error from e
        return _kernel_fn


def _reset_for_tests() -> None:
    """Forget the loaded kernel and any cached failure, so that the next call builds or loads it again."""
    global _kernel_fn, _kernel_error, _kernel_path
    with _lock:
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
        _kernel()
    except XnorUnavailable:
        return False
    return True


def xnor_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    in_features: int,
    out_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Binary-input x binary-weight linear layer with XNOR and popcount, bit-identical to the dense torch path.

    Each input entry counts as +1 if it is `>= 0` (so `0.0` and `-0.0` give +1) and as -1 otherwise; a NaN entry
    is an error.
    The output is `y = (sign(x) @ sign(W).T) * out_scale + bias`, where the integer dot product is exact, and the
    multiply and the add are two separate float32 roundings, as in torch. Inference only: no autograd graph.

    Args:
        x: Float32 CPU tensor `[..., in_features]`, any leading dimensions (rows need unit stride, else a copy).
        weight_packed: Uint8 CPU tensor `[N, ceil(in_features / 8)]` in `stompp_hf.core.packing.pack_signs`
            layout: entry `k` of a row is bit `k % 8` (least significant first) of byte `k // 8`, a set bit meaning
            +1. Bits past `in_features` in the last byte are ignored.
        in_features: The number of input features `K` (any positive int). Exactness holds for `K < 2**24`.
        out_scale: Optional float32 CPU tensor `[N]`, multiplied into the integer dot products.
        bias: Optional float32 CPU tensor `[N]`, added last.
        num_threads: Threads to use (default `torch.get_num_threads()`); small problems use fewer.

    Returns:
        Float32 tensor `[..., N]`.

    Raises:
        ValueError: On a wrong dtype, device or shape, when `x` has a NaN value, or when grad mode is on and `x`,
            `out_scale` or `bias` requires grad (the kernel has no backward pass).
        XnorUnavailable: When the kernel could not be compiled or loaded.
        MemoryError: When the kernel's scratch buffers (packed activations, a weight copy) cannot be allocated.
    """
    fn = _kernel_fn or _kernel()
    k = int(in_features)
    if not isinstance(x, torch.Tensor) or x.dtype is not _F32 or not x.is_cpu:
        raise ValueError(f"xnor_linear expects x as a float32 CPU tensor, got {_describe(x)}.")
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
    scale_ptr = bias_ptr = None
    grad = torch.is_grad_enabled() and x.requires_grad
    if out_scale is not None:
        out_scale = _check_vector("out_scale", out_scale, n)
        grad = grad or (out_scale.requires_grad and torch.is_grad_enabled())
        scale_ptr = out_scale.data_ptr()
    if bias is not None:
        bias = _check_vector("bias", bias, n)
        grad = grad or (bias.requires_grad and torch.is_grad_enabled())
        bias_ptr = bias.data_ptr()
    if grad:
        raise ValueError(
            "The XNOR kernel is inference-only (no autograd): call it under torch.no_grad() or "
            "torch.inference_mode(), or with tensors that do not require grad."
        )
    if num_threads is None:
        num_threads = torch.get_num_threads()
    elif num_threads < 1:
        raise ValueError(f"xnor_linear expects num_threads >= 1, got {num_threads}.")
    if not weight_packed.is_contiguous():
        weight_packed = weight_packed.contiguous()

    x2 = x if x.ndim == 2 else x.reshape(-1, k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=_F32)
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
        )
        if rc == _RC_NAN:
            raise ValueError(
                f"xnor_linear got an input x of shape {tuple(x.shape)} with NaN values, which have no sign: "
                "the layers before this one produced NaN (e.g. a diverged model or an invalid input)."
            )
        if rc == _RC_NO_MEMORY:
            raise MemoryError("xnor_linear could not allocate its scratch memory.")
    return y if x.ndim == 2 else y.view(*x.shape[:-1], n)


def _check_vector(name: str, t: object, n: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype is not _F32 or not t.is_cpu or t.shape != (n,):
        raise ValueError(f"xnor_linear expects {name} as a float32 CPU tensor [{n}], got {_describe(t)}.")
    return t if t.stride(0) == 1 else t.contiguous()


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} on {t.device} of shape {tuple(t.shape)}"
    return type(t).__name__
