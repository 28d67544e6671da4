"""Exact dense int8 path for binary linear layers: +-1 operands as int8 through `torch._int_mm`.

`int8_linear(x, weight_int8, out_scale, bias)` computes what `xnor_linear` computes, bit for bit: the signs of `x`
and the weight as int8 +-1, one int8 x int8 -> int32 matrix product (exact: |y| <= K, no rounding anywhere), then
`(float)y * out_scale + bias` with two roundings, as torch does. Where the CPU has a dense int8 engine (Intel AMX:
16 x 64 x 16 int8 multiply-adds per tile instruction, about 1024 per cycle per core), oneDNN's `_int_mm` can beat
XNOR-popcount (whose bound is 512 binary multiply-adds per cycle per core with AVX-512 VPOPCNTDQ); with AVX-512 VNNI
alone (`vpdpbusd`, 64 per instruction) it cannot.

Memory: the int8 weight is 8 bits per binary weight, 8x the packed checkpoint's 1 bit and a quarter of float32;
`BinaryLinear` builds it on first use and keeps it only while this path is in use.

`"auto"` (`stompp_hf.set_kernel`) considers this path only on CPUs with `amx_int8` (`worth_measuring`), and then
only for the shapes where it measured faster in this process (`choose`): one timing of both paths per layer shape and
power-of-two row count, the first time that shape runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..core.packing import unpack_signs
from . import xnor
from .cpu import cpu_flags

__all__ = ["available", "choose", "chosen_anywhere", "int8_linear", "int8_weight", "worth_measuring"]

#: Timed calls per path when `choose` measures a shape (after one untimed call each); the best one counts.
MEASURE_CALLS = 2

# (row-count bucket, N, K) -> "int8" or "xnor": what `choose` measured in this process.
_choices: dict[tuple[int, int, int], str] = {}


def available() -> bool:
    """Whether this torch has `torch._int_mm` (int8 x int8 -> int32 on CPU) and the kernel library loads."""
    return hasattr(torch, "_int_mm") and xnor.is_available()


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
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, out_scale, bias)):
        raise ValueError("The int8 path is inference-only (no autograd): call it under torch.no_grad().")
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


def _bucket(m: int) -> int:
    return 1 << max(0, m - 1).bit_length()


def choose(
    m: int, n: int, k: int, run_xnor: Callable[[], torch.Tensor], run_int8: Callable[[], torch.Tensor]
) -> tuple[str, torch.Tensor]:
    """The faster path for an `m x k` by `k x n` product, measured the first time its (row bucket, n, k) comes up in
    this process, and that path's output for the current call.

    Both paths give the same bits, so the choice changes only the time a call takes.
    """
    key = (_bucket(m), n, k)
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
