"""Fused elementwise passes of a training step on CPU (docs/design.md, "Fused passes").

A binarized input costs a training step several activation-sized passes when written as torch ops (the sign, the
sum of |x| for beta, the clip, the window `1{|x| <= c}`, the product with the gradient), and on a CPU each pass costs
its memory traffic, not its arithmetic. `CpuFusedOps` does each group in one pass, in C (`xnor_train.c`, built into
the XNOR kernel's library), with the values of the torch expressions bit for bit (the sum of |x| is accumulated in
double, so it is at least as close to the exact sum as torch's float32 one). `stompp_hf.nn` registers it with
`stompp_hf.core.functional.set_fused_ops`, so the binarizers of every training module use it. A tensor it does not
handle (another device or dtype, not dense, a subclass such as `DTensor`, small, under `torch.compile`, and for the
masked pass a channels-last input, whose per-sample mask it would read out of order) takes the torch ops, as does
everything when the kernel cannot be built. `STOMPP_HF_FUSED_PASSES=0` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from . import xnor
from .build import XnorUnavailable
from .xnor import _library

__all__ = ["CpuFusedOps", "enabled"]

logger = logging.getLogger(__name__)

_ENV = "STOMPP_HF_FUSED_PASSES"
#: dtype codes of the C entry points
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
#: Smaller tensors take the torch ops: a fused pass saves only microseconds per call there (sign and sum |x| of 1024
#: float32 values: 20 against 30 us on the AMX Xeon, 2 threads; 26 against 62 us at 65536).
_MIN_NUMEL = 1 << 14
#: Tensor types whose data the kernels read directly (a layer's weight is a Parameter; no subclass such as DTensor).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def enabled() -> bool:
    """Whether `stompp_hf.nn` registers the fused passes: unless `STOMPP_HF_FUSED_PASSES=0`."""
    return os.environ.get(_ENV, "1").strip() != "0"


def _dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill its memory without gaps, in the standard or the channels-last order."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _plain(*tensors: torch.Tensor, ordered: bool = False, mixed: bool = False) -> bool:
    """Tensors the C passes read as flat arrays: plain CPU tensors of one supported dtype (`mixed`: the first
    float32 and the others float32 or bfloat16, `_pair`), dense with the same strides (contiguous, or channels-last
    where the pass is elementwise; `ordered`: contiguous), big enough, outside `torch.compile`."""
    first = tensors[0]
    return (
        first.dtype in _DTYPES
        and first.numel() >= _MIN_NUMEL
        and not torch.compiler.is_compiling()
        and (first.is_contiguous() if ordered else _dense(first))
        and all(
            type(t) is torch.Tensor
            and t.is_cpu
            and (t.dtype == first.dtype or (mixed and _pair(first.dtype, t.dtype)))
            and t.stride() == first.stride()
            and not t.is_neg()
            for t in tensors
        )
    )


def _pair(dtype: torch.dtype, other: torch.dtype | None) -> bool:
    """Whether a pass over `dtype` values takes an operand or result of dtype `other` (None: `dtype` itself): the
    same dtype, or bfloat16 with float32 (the autocast operand of a float32 activation, or its gradient)."""
    return other is None or other == dtype or (dtype == torch.float32 and other == torch.bfloat16)


def _window_operand(window: object, dtype: torch.dtype) -> bool:
    """Whether `window` is a window the gradient passes read as a flat array: a plain contiguous CPU tensor of
    `dtype` (int8 entries, or uint8 bits)."""
    return type(window) is torch.Tensor and window.dtype == dtype and window.is_cpu and window.is_contiguous()


def _windowed_pass(fn, grad: torch.Tensor, window: torch.Tensor, dtype: torch.dtype, in_place: bool):
    """`fn(g, window, out, n, dtype, g's dtype, threads)`, a C pass that applies a saved window to a gradient
    (`ew_window_apply`, `ew_bits_grad`), into `grad` itself with `in_place` where it has `dtype`; None where the
    dtypes do not pair or the pass refuses."""
    if dtype not in _DTYPES or not _pair(dtype, grad.dtype):
        return None
    out = grad if in_place and grad.dtype == dtype else torch.empty_like(grad, dtype=dtype)
    rc = fn(
        grad.data_ptr(),
        window.data_ptr(),
        out.data_ptr(),
        grad.numel(),
        _DTYPES[dtype],
        _DTYPES[grad.dtype],
        torch.get_num_threads(),
    )
    return None if rc else out


class CpuFusedOps:
    """`stompp_hf.core.functional.FusedOps` on CPU, through the C passes of the XNOR kernel's library. The library
    is built on the first call; where it cannot be, every call answers None (the torch ops run)."""

    def __init__(self) -> None:
        self._logged = False

    def _kernels(self):
        """The loaded library, or None (logged once) when it cannot be built or loaded (`xnor._library` remembers
        the failure, so a failed build is not retried on every call)."""
        try:
            return _library()
        except XnorUnavailable as e:
            if not self._logged:
                self._logged = True
                logger.info("Fused training passes unavailable, using torch ops: %s", e)
            return None

    def sign(
        self, u: torch.Tensor, with_abs_sum: bool, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if not _plain(u) or not _pair(u.dtype, dtype) or (lib := self._kernels()) is None:
            return None
        out = torch.empty_like(u, dtype=dtype)
        total = ctypes.c_double()
        rc = lib.ew_sign(
            u.data_ptr(),
            out.data_ptr(),
            u.numel(),
            _DTYPES[u.dtype],
            _DTYPES[out.dtype],
            ctypes.addressof(total) if with_abs_sum else None,
            torch.get_num_threads(),
        )
        if rc:
            return None
        return out, (torch.tensor(total.value, dtype=torch.float32) if with_abs_sum else None)

    def abs_sum(self, u: torch.Tensor) -> torch.Tensor | None:
        if not _plain(u) or (lib := self._kernels()) is None:
            return None
        total = ctypes.c_double()
        dt = _DTYPES[u.dtype]
        rc = lib.ew_sign(u.data_ptr(), None, u.numel(), dt, dt, ctypes.addressof(total), torch.get_num_threads())
        return None if rc else torch.tensor(total.value, dtype=torch.float32)

    def windowed_grad(
        self,
        grad: torch.Tensor,
        u: torch.Tensor,
        lo: float,
        hi: float,
        multiplier: torch.Tensor | None,
        in_place: bool = False,
    ) -> torch.Tensor | None:
        # a bfloat16 gradient of a float32 u (an autocast op's) is widened: the result has u's dtype
        if grad.shape != u.shape or not _plain(u, grad, mixed=True) or (lib := self._kernels()) is None:
            return None
        if multiplier is not None and (multiplier.dim() != 0 or multiplier.dtype != u.dtype or not multiplier.is_cpu):
            return None
        # elementwise: each entry read before it is written
        out = grad if in_place and grad.dtype == u.dtype else torch.empty_like(u)
        mult = 0.0 if multiplier is None else multiplier.item()
        rc = lib.ew_window_grad(
            grad.data_ptr(),
            u.data_ptr(),
            out.data_ptr(),
            grad.numel(),
            _DTYPES[u.dtype],
            _DTYPES[grad.dtype],
            lo,
            hi,
            int(multiplier is not None),
            mult,
            torch.get_num_threads(),
        )
        return None if rc else out

    def scale_bias(self, y: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
        # per last-dimension channel of a contiguous y; the factors already in y's dtype (as the torch ops cast them)
        if not _plain(y, ordered=True) or y.dim() < 1 or (lib := self._kernels()) is None:
            return False
        cols = y.shape[-1]
        for t, sizes in ((scale, (1, cols)), (bias, (cols,))):
            if t is not None and (
                type(t) is not torch.Tensor
                or t.dtype != y.dtype
                or not t.is_cpu
                or not t.is_contiguous()
                or t.numel() not in sizes
                or (t.dim() > 0 and t.shape[-1] != t.numel())
            ):
                return False
        rc = lib.ew_scale_bias(
            y.data_ptr(),
            y.numel() // cols,
            cols,
            _DTYPES[y.dtype],
            None if scale is None else scale.data_ptr(),
            0 if scale is None else scale.numel(),
            None if bias is None else bias.data_ptr(),
            torch.get_num_threads(),
        )
        return rc == 0

    def window_apply(
        self, grad: torch.Tensor, window: torch.Tensor, dtype: torch.dtype, in_place: bool = False
    ) -> torch.Tensor | None:
        if (
            grad.shape != window.shape
            or not _plain(grad, ordered=True)
            or not _window_operand(window, torch.int8)
            or (lib := self._kernels()) is None
        ):
            return None
        return _windowed_pass(lib.ew_window_apply, grad, window, dtype, in_place)

    def masked(
        self,
        u: torch.Tensor,
        mask: torch.Tensor | None,
        value: float,
        bound: float,
        edges: tuple[float, float] | None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if mask is None:  # every entry continuous: the clamp, elementwise
            if not _plain(u) or not _pair(u.dtype, dtype) or (lib := self._kernels()) is None:
                return None
        else:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or not _plain(u, ordered=True):
                return None
            while mask.dim() > 0 and mask.shape[0] == 1:  # leading broadcast dimensions
                mask = mask[0]
            if (
                type(mask) is not torch.Tensor
                or not mask.is_cpu
                or not mask.is_contiguous()
                or mask.dim() > u.dim()
                or tuple(u.shape[u.dim() - mask.dim() :]) != tuple(mask.shape)
                or not _pair(u.dtype, dtype)
                or (lib := self._kernels()) is None
            ):
                return None
        out = torch.empty_like(u, dtype=dtype)
        window = torch.empty_like(u, dtype=torch.int8) if edges is not None else None
        lo, hi = edges if edges is not None else (0.0, 0.0)
        rc = lib.ew_masked(
            u.data_ptr(),
            None if mask is None else mask.data_ptr(),
            1 if mask is None else max(mask.numel(), 1),
            out.data_ptr(),
            None if window is None else window.data_ptr(),
            u.numel(),
            _DTYPES[u.dtype],
            _DTYPES[out.dtype],
            value,
            bound,
            lo,
            hi,
            torch.get_num_threads(),
        )
        return None if rc else (out, window)

    def clip_bits(
        self, u: torch.Tensor, bound: float, edges: tuple[float, float], dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        # elementwise in memory order (the bits follow it; the backward reads its gradient in the same order)
        if not _plain(u) or not _pair(u.dtype, dtype) or (lib := self._kernels()) is None:
            return None
        out = torch.empty_like(u, dtype=dtype)
        bits = torch.empty((u.numel() + 7) // 8, dtype=torch.uint8)
        rc = lib.ew_clip_bits(
            u.data_ptr(),
            out.data_ptr(),
            bits.data_ptr(),
            u.numel(),
            _DTYPES[u.dtype],
            _DTYPES[out.dtype],
            bound,
            *edges,
            torch.get_num_threads(),
        )
        return None if rc else (out, bits)

    def bits_grad(
        self, grad: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype, in_place: bool = False
    ) -> torch.Tensor | None:
        # the bits of `clip_bits` on a u of grad's shape and memory order
        if (
            not _plain(grad)
            or not _window_operand(bits, torch.uint8)
            or bits.numel() != (grad.numel() + 7) // 8
            or (lib := self._kernels()) is None
        ):
            return None
        return _windowed_pass(lib.ew_bits_grad, grad, bits, dtype, in_place)

    def scaled_sign(self, u: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        # a row-major 2-D u (a linear weight), one float32-representable scale per row
        if (
            u.dim() != 2
            or not _plain(u, ordered=True)
            or not _pair(u.dtype, dtype)
            or type(scale) is not torch.Tensor
            or not scale.is_cpu
            or scale.numel() != u.shape[0]
            or scale.dtype not in _DTYPES
            or (lib := self._kernels()) is None
        ):
            return None
        rows = scale.detach().to(torch.float32).reshape(-1).contiguous()  # exact: bfloat16 widens to float32
        out = torch.empty_like(u, dtype=dtype)
        rc = lib.ew_row_sign(
            u.data_ptr(),
            rows.data_ptr(),
            u.shape[0],
            u.shape[1],
            _DTYPES[u.dtype],
            _DTYPES[dtype],
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return None if rc else out

    def clip_inplace(self, u: torch.Tensor, bound: float, mask: torch.Tensor | None = None) -> bool:
        # a contiguous u (the mask, a bool of u's shape, read in the same order); one write per block with an entry
        # outside the bound
        if (
            not _plain(u, ordered=True)
            or not bound >= 0.0
            or (
                mask is not None
                and (
                    type(mask) is not torch.Tensor
                    or mask.dtype != torch.bool
                    or not mask.is_cpu
                    or mask.shape != u.shape
                    or not mask.is_contiguous()
                )
            )
            or (lib := self._kernels()) is None
        ):
            return False
        rc = lib.ew_clip_inplace(
            u.data_ptr(),
            None if mask is None else mask.data_ptr(),
            u.numel(),
            _DTYPES[u.dtype],
            bound,
            torch.get_num_threads(),
        )
        return rc == 0

    def binary_linear_applies(self, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
        # plain CPU tensors outside torch.compile, and an XNOR path measured faster than the dense matmul: avx512
        # (either dtype; the only one taking bfloat16), or avx2 in float32 (docs/design.md, "Frozen layers")
        if not (
            dtype in _DTYPES
            and all(type(t) in _PLAIN_TYPES and t.is_cpu and t.dtype in _DTYPES for t in (x, weight))
            and weight.dim() == 2
            and x.dim() >= 1
            and x.shape[-1] == weight.shape[1]
            and not torch.compiler.is_compiling()
            and (lib := self._kernels()) is not None
        ):
            return False
        if "avx512" in lib.paths:
            return xnor._forced in (None, "avx512")
        float32 = dtype == x.dtype == weight.dtype == torch.float32
        return float32 and "avx2" in lib.paths and xnor._forced in (None, "avx2")

    def binary_linear(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        if not self.binary_linear_applies(x, weight, x.dtype):
            return None
        n, k = weight.shape
        vectors = []
        for t in (scale, bias):  # float32 vectors holding the values scale_output applies (cast to y's dtype)
            if t is not None:
                if type(t) not in _PLAIN_TYPES or not t.is_cpu or t.numel() not in (1, n):
                    return None
                t = t.detach().to(x.dtype).to(torch.float32).reshape(-1).expand(n).contiguous()
            vectors.append(t)
        try:
            return xnor.xnor_linear(x, xnor.pack_signs(weight), k, *vectors)
        except ValueError:  # a NaN in x: binary_sign makes it -1, the kernel refuses it (nothing written)
            return None
