"""Exact dense int8 paths for binary layers: +-1 operands as int8, int32 sums.

Both compute what `xnor_linear` / `binary_conv2d` compute, bit for bit: the signs of `x` and of the weight as int8
+-1 (0 for zero padding), int8 x int8 -> int32 products (exact: |y| <= K < 2**24, no rounding anywhere), then
`(float)y * out_scale + bias` with two roundings, as torch does.

* AMX tiles (`amx_linear`, `amx_conv2d`; C in `xnor_amx.c`): on CPUs with Intel AMX int8 a tile instruction
  (TDPBSSD) does 16 x 64 x 16 int8 multiply-adds, about 1024 per cycle per core, twice the 512 binary ones of a
  512-bit VPOPCNTQ; the convolution reads a zero-bordered channels-last int8 image, so its zero padding needs no
  correction. Linear layers and convolutions with `groups == 1`.
* `torch._int_mm` (`int8_linear`): the same product through torch, for linear layers, where AMX is not available.
  With AVX-512 VNNI alone (`vpdpbusd`, 64 multiply-adds per instruction) it cannot beat XNOR-popcount; on the
  AMX Xeon of this project it was also 2-5x slower than the AMX kernel (benchmarks/results/inference.md).

Memory: an int8 weight is 8 bits per binary weight (the AMX layout pads outputs to a multiple of 32 and inputs per
tap to a multiple of 64), 8x the packed checkpoint's 1 bit and a quarter of float32; the packed modules build it on
first use and keep it only while this path is in use.

`"auto"` (`stompp_hf.set_kernel`) considers the int8 path only on CPUs with `amx_int8` (`worth_measuring`), and then
only for the shapes where it measured faster in this process (`choose`): one timing of both paths per layer shape and
power-of-two row (or batch) count, the first time that shape runs.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence

import torch

from ..core.packing import unpack_signs
from . import xnor
from .cpu import cpu_flags

__all__ = [
    "amx_available",
    "amx_conv2d",
    "amx_linear",
    "amx_weight",
    "available",
    "choose",
    "chosen_anywhere",
    "int8_linear",
    "int8_weight",
    "worth_measuring",
]

# Below this many (output, 64-input chunk) pairs per thread, waking another thread costs more than it saves.
_MIN_WORK_PER_THREAD = 1 << 13

#: Timed calls per path when `choose` measures a shape (after one untimed call each); the best one counts.
MEASURE_CALLS = 2

# (row-count bucket, N, K) for a linear layer, or a conv's (batch bucket, geometry) -> "int8" or "xnor": what
# `choose` measured in this process.
_choices: dict[tuple, str] = {}


def available() -> bool:
    """Whether an int8 path runs here: the AMX kernel (`amx_available`), or `torch._int_mm` (int8 x int8 -> int32
    on CPU) with the kernel library loaded."""
    return amx_available() or (hasattr(torch, "_int_mm") and xnor.is_available())


def amx_available() -> bool:
    """Whether the AMX int8 kernel runs here: the kernel library loads, the CPU has AMX tiles and int8 (and the
    AVX-512 path that packs for them), and the OS lets this process use the tile registers (on Linux the library
    asks for that permission, `arch_prctl(ARCH_REQ_XCOMP_PERM)`, on the first call)."""
    return xnor.is_available() and bool(xnor._library().amx_available())


def amx_weight(weight_packed: torch.Tensor, out_features: int, in_per_tap: int, taps: int = 1) -> torch.Tensor:
    """The +-1 weight in the AMX kernel's layout (int8 as uint8 bytes, outputs padded to 32, inputs per tap to 64):
    for `amx_linear` (`taps=1`, `in_per_tap` = K) or `amx_conv2d` (`in_per_tap` = in channels, `taps = kh * kw`).

    Raises:
        ValueError: On a `weight_packed` that is not uint8 `[out_features, ceil(in_per_tap * taps / 8)]` on CPU.
    """
    lib = xnor._library()
    xnor._check_packed(weight_packed, out_features, (int(in_per_tap) * int(taps) + 7) // 8, "amx_weight")
    size = lib.amx_weight_bytes(out_features, in_per_tap, taps)
    if size < 0:
        raise ValueError(f"amx_weight cannot lay out {out_features} outputs of {in_per_tap} inputs x {taps} taps.")
    out = torch.empty(size, dtype=torch.uint8)
    lib.amx_prepare(weight_packed.contiguous().data_ptr(), out_features, in_per_tap, taps, out.data_ptr())
    return out


def _check_amx_weight(weight_amx: torch.Tensor, out_features: int, in_per_tap: int, taps: int, caller: str) -> None:
    size = xnor._library().amx_weight_bytes(out_features, in_per_tap, taps)
    if (
        not isinstance(weight_amx, torch.Tensor)
        or weight_amx.dtype is not torch.uint8
        or not weight_amx.is_cpu
        or not weight_amx.is_contiguous()
        or weight_amx.numel() != size
    ):
        raise ValueError(
            f"{caller} expects weight_amx from amx_weight ({size} uint8 bytes), got {xnor._describe(weight_amx)}."
        )


def _check_inference(caller: str, *tensors: torch.Tensor | None) -> None:
    """Raise when grad mode is on and one of `tensors` requires grad: the int8 paths have no backward pass."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(f"{caller} is inference-only (no autograd): call it under torch.no_grad().")


def amx_linear(
    x: torch.Tensor,
    weight_amx: torch.Tensor,
    out_features: int,
    out_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    strict: bool = False,
    num_threads: int | None = None,
) -> torch.Tensor:
    """`xnor_linear` on AMX int8 tiles: `y = (sign(x) @ sign(W).T) * out_scale + bias`, the same bits.

    Args:
        x: Float32 or bfloat16 CPU tensor `[..., K]` (the output has its dtype, rounded as in `xnor_linear`); NaN
            raises `ValueError`.
        weight_amx: `amx_weight(weight_packed, out_features, K)`.
        out_features: N.
        out_scale, bias: Optional float32 `[N]`.
        strict: `x` is already +-1: any other value raises `xnor.InputNotBinary`, nothing computed.
        num_threads: Threads to use (default `torch.get_num_threads()`).

    Raises:
        ValueError: On wrong dtypes or shapes, a NaN, grad mode with a tensor that requires grad, or no AMX here.
    """
    lib = xnor._library()
    if not isinstance(x, torch.Tensor) or x.dtype not in xnor.ACTIVATION_DTYPES or not x.is_cpu or x.ndim < 1:
        raise ValueError(
            f"amx_linear expects x as a float32 or bfloat16 CPU tensor [..., K], got {xnor._describe(x)}."
        )
    k = x.shape[-1]
    if k >= 1 << 24:
        raise ValueError(f"amx_linear is exact for K < 2**24, got K = {k}.")
    _check_amx_weight(weight_amx, out_features, k, 1, "amx_linear")
    _check_inference("amx_linear", x, out_scale, bias)
    out_scale, scale_ptr = xnor._vector_pointer("out_scale", out_scale, out_features, "amx_linear")
    bias, bias_ptr = xnor._vector_pointer("bias", bias, out_features, "amx_linear")
    x2 = x.reshape(-1, k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, out_features), dtype=x.dtype)
    if m and k:
        rc = lib.amx_linear(
            x2.data_ptr(),
            m,
            x2.stride(0),
            k,
            weight_amx.data_ptr(),
            out_features,
            scale_ptr,
            bias_ptr,
            y.data_ptr(),
            xnor._threads(num_threads, "amx_linear"),
            _MIN_WORK_PER_THREAD,
            int(strict),
            int(x.dtype is torch.bfloat16),
        )
        xnor._raise_for(rc, "amx_linear", x)
    return y.view(*x.shape[:-1], out_features)


def amx_conv2d(
    x: torch.Tensor,
    weight_amx: torch.Tensor,
    weight_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    out_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    strict: bool = False,
    num_threads: int | None = None,
) -> torch.Tensor:
    """`binary_conv2d` (groups = 1, zero padding) on AMX int8 tiles: the same bits, in the memory format of `x`.

    Args:
        x: Float32 or bfloat16 CPU tensor `[B, C, H, W]` (the output has its dtype, rounded as in
            `xnor.xnor_linear`). The kernel reads channels-last; any other layout is copied to it first, and the
            output copied back to NCHW (`F.conv2d`'s format for such an input).
        weight_amx: `amx_weight(weight_packed, O, C, kh * kw)`.
        weight_shape: `(O, C, kh, kw)`.
        stride, padding, dilation, out_scale, bias, strict, num_threads: As in `binary_conv2d`.

    Raises:
        ValueError: As `binary_conv2d`, or no AMX here.
    """
    from .bconv import conv_geometry

    lib = xnor._library()
    o, c, kh, kw = (int(v) for v in weight_shape)
    geometry, (b, ho, wo) = conv_geometry(x, weight_shape, stride, padding, dilation, 1, "amx_conv2d")
    _check_amx_weight(weight_amx, o, c, kh * kw, "amx_conv2d")
    _check_inference("amx_conv2d", x, out_scale, bias)
    out_scale, scale_ptr = xnor._vector_pointer("out_scale", out_scale, o, "amx_conv2d")
    bias, bias_ptr = xnor._vector_pointer("bias", bias, o, "amx_conv2d")
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    xc = x if channels_last else x.contiguous(memory_format=torch.channels_last)
    geometry[4:8] = xc.stride()
    y = torch.empty((b, ho, wo, o), dtype=x.dtype).permute(0, 3, 1, 2)
    if b == 0:
        return y if channels_last else y.contiguous()
    rc = lib.amx_conv2d(
        xc.data_ptr(),
        ctypes.addressof(geometry),
        weight_amx.data_ptr(),
        scale_ptr,
        bias_ptr,
        y.data_ptr(),
        int(strict),
        xnor._threads(num_threads, "amx_conv2d"),
        _MIN_WORK_PER_THREAD,
        int(x.dtype is torch.bfloat16),
    )
    xnor._raise_for(rc, "amx_conv2d", x)
    return y if channels_last else y.contiguous()


def worth_measuring() -> bool:
    """Whether `"auto"` should time the int8 path against XNOR-popcount: only on CPUs with AMX int8 tiles.

    The rule: without AMX the CPU's densest int8 instruction is AVX-512 VNNI's `vpdpbusd` (64 multiply-adds), far
    below the 512 binary multiply-adds of one `vpopcntq`: measured on an AMD EPYC (AVX-512 VNNI, no AMX, one
    thread, BERT-base FFN shapes at 128 and 1024 rows), `torch._int_mm` alone took 4 to 5 times as long as the whole
    XNOR call, and this path with its operand and epilogue passes 5 to 7 times.
    """
    return "amx_int8" in cpu_flags() and available()


def int8_weight(weight_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The +-1 weight as int8 `[K, N]` (K-major, the layout `_int_mm` is fastest with), from the packed signs."""
    signs = unpack_signs(weight_packed, in_features)  # bool [N, K]
    return (signs.to(torch.int8) * 2 - 1).t().contiguous()


def int8_linear(
    x: torch.Tensor,
    weight_int8: torch.Tensor,
    out_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y = (sign(x) @ W) * out_scale + bias` with int8 +-1 operands and int32 accumulation, bit-identical to the
    dense torch path and to `xnor_linear`. Inference only.

    Args:
        x: Float32 CPU tensor `[..., K]`; NaN raises `ValueError`, as in `xnor_linear`.
        weight_int8: `int8_weight(weight_packed, K)`, `[K, N]`.
        out_scale: Optional float32 `[N]`.
        bias: Optional float32 `[N]`.

    Returns:
        Float32 `[..., N]`.
    """
    lib = xnor._library()
    k, n = weight_int8.shape
    if not isinstance(x, torch.Tensor) or x.dtype is not torch.float32 or not x.is_cpu or x.shape[-1] != k:
        raise ValueError(f"int8_linear expects x as a float32 CPU tensor [..., {k}], got {xnor._describe(x)}.")
    if weight_int8.dtype is not torch.int8 or not weight_int8.is_contiguous():
        raise ValueError(f"int8_linear expects weight_int8 from int8_weight, got {xnor._describe(weight_int8)}.")
    if k >= 1 << 24:
        raise ValueError(f"int8_linear is exact for K < 2**24, got K = {k}.")
    _check_inference("The int8 path", x, out_scale, bias)
    out_scale, scale_ptr = xnor._vector_pointer("out_scale", out_scale, n, "int8_linear")
    bias, bias_ptr = xnor._vector_pointer("bias", bias, n, "int8_linear")
    x2 = x.reshape(-1, k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    if m:
        signs = torch.empty((m, k), dtype=torch.int8)
        xnor._raise_for(lib.signs_i8(x2.data_ptr(), m, x2.stride(0), k, signs.data_ptr()), "int8_linear", x)
        acc = torch._int_mm(signs, weight_int8)
        lib.epilogue_i32(acc.data_ptr(), m, n, scale_ptr, bias_ptr, y.data_ptr())
    return y.view(*x.shape[:-1], n)


def bucket(m: int) -> int:
    """`m` rounded up to a power of two: the row (or batch) count a measurement of `choose` stands for."""
    return 1 << max(0, m - 1).bit_length()


def choose(
    key: tuple, run_xnor: Callable[[], torch.Tensor], run_int8: Callable[[], torch.Tensor]
) -> tuple[str, torch.Tensor]:
    """The faster path for the problem `key` names (a linear layer's `(bucket(rows), n, k)`; a convolution's batch
    bucket, input and weight shapes and geometry), measured the first time it comes up in this process, and that
    path's output for the current call. A raising path (e.g. `xnor.InputNotBinary`) raises before anything is
    recorded.

    Both paths give the same bits, so the choice changes only the time a call takes.
    """
    choice = _choices.get(key)
    if choice is not None:
        return choice, run_int8() if choice == "int8" else run_xnor()
    runs = {"xnor": run_xnor, "int8": run_int8}
    best: dict[str, float] = {}
    out = None
    for name, fn in runs.items():
        out = fn()  # untimed: the first int8 call also builds the layer's int8 weight
        for _ in range(MEASURE_CALLS):
            start = time.perf_counter()
            out = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    choice = min(best, key=best.__getitem__)
    _choices[key] = choice
    return choice, out if choice == "int8" else run_xnor()


def chosen_anywhere() -> bool:
    """Whether `choose` has picked the int8 path for any shape in this process."""
    return "int8" in _choices.values()


def _reset_for_tests() -> None:
    _choices.clear()
