"""The masked binarize, implemented once and shared by every layer type (docs/design.md, "Core", Eq. 1-3).

For a tensor `u` (a weight or a layer input), a boolean mask `M` (True = frozen), a scale `a` (a constant in the
backward pass) and, for inputs, a clip bound `c`::

    forward    u' = M * a * sign(u) + (1 - M) * smooth(u)         smooth(u) = clamp(u, -c, c)  for inputs,
                                                                             u                 for weights
    "stompp"      du = (1 - M) * g * smooth'(u)                    (Eq. 2 of the StoMPP paper: no STE at all)
    "stompp_ste"  du = (1 - M) * g * smooth'(u) + M * g * ste'(u)  (STE on frozen entries only)
    "ste"         M = 1 everywhere, du = g * ste'(u)               (BinaryConnect / BinaryNet STE)

              smooth'(u)   ste'(u)
    inputs    1{|u| <= c}  1{|u| <= c}    BinaryNet's clipped identity
    weights   1            1              BinaryConnect's identity (its latent weights are clipped to [-1, 1]
                                          instead, by `ProgressionController.clip_latent_weights`)

So a weight's STE gradient is `g` itself, whatever `|u|`: for weights, "stompp_ste" is the identity everywhere.
`c` is `activation_clip * beta` (beta the activation scale, 1 without activation scaling). `g` is the gradient with
respect to `a * sign(u)`: where the caller applies `a` to the layer output instead (the factored form), the STE
gradient is divided by `a` (a zero `a` passes no gradient). `sign(0) = +1` everywhere in this library, so that
every binary value is in {-1, +1}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from .masks import MaskState
from .packing import unpack_signs

#: The training rules of a binarized tensor (`StoMPPConfig.weights` / `activations`; None keeps it full precision).
RULES: tuple[str, ...] = ("stompp", "stompp_ste", "ste")


class FusedOps(Protocol):
    """Fused implementations of this module's elementwise passes: one pass over memory each, where the torch ops
    take several (docs/design.md, "Fused passes"). Each gives the values of the torch expression it replaces, bit for
    bit, or None where it does not apply (another device, dtype or layout, a tensor subclass, `torch.compile`, or
    no compiled kernel), and the torch ops run instead. One of them is not elementwise: the binary product of a
    frozen linear layer (`binary_linear`, the XNOR kernel). `stompp_hf.kernels.elementwise` registers one with
    `set_fused_ops`; `core` itself imports no kernel."""

    def sign(
        self, u: torch.Tensor, with_abs_sum: bool, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """`(binary_sign(u).to(dtype), abs_sum(u) if with_abs_sum else None)` from one read of `u`."""

    def abs_sum(self, u: torch.Tensor) -> torch.Tensor | None:
        """`abs_sum(u)`."""

    def windowed_grad(
        self,
        grad: torch.Tensor,
        u: torch.Tensor,
        lo: float,
        hi: float,
        multiplier: torch.Tensor | None,
        in_place: bool = False,
    ) -> torch.Tensor | None:
        """`hardtanh_backward(grad.to(u.dtype), u, lo, hi)`, times the 0-d `multiplier` (rounded once) when given;
        written into `grad` itself with `in_place` (where it has `u`'s dtype)."""

    def scale_bias(self, y: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
        """`y.mul_(scale).add_(bias)` for factors of `y`'s dtype over its last dimension (a scale may also be one
        value), in one pass; False (nothing done) where it does not apply."""

    def window_apply(
        self, grad: torch.Tensor, window: torch.Tensor, dtype: torch.dtype, in_place: bool = False
    ) -> torch.Tensor | None:
        """`grad.to(dtype) * window.to(dtype)` for an int8 0/1 `window` of `grad`'s shape (written into `grad` with
        `in_place`, where it has `dtype`)."""

    def masked(
        self,
        u: torch.Tensor,
        mask: torch.Tensor | None,
        value: float,
        bound: float,
        edges: tuple[float, float] | None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """`(where(mask, value * sign(u), clamp(u, -bound, bound)).to(dtype), int8 window)` (dtype None: `u`'s),
        for a bool `mask` that broadcasts to `u` (None: the clamp alone); the window is `lo < u < hi` for
        `edges = (lo, hi)` (None: no window)."""

    def clip_bits(
        self, u: torch.Tensor, bound: float, edges: tuple[float, float], dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(clamp(u, -bound, bound).to(dtype), window bits)`: the window `lo < u < hi` (`edges`) one bit per entry in
        `u`'s memory order, entry `i` bit `i % 8` of byte `i // 8` (uint8, `ceil(numel / 8)` bytes)."""

    def bits_grad(
        self, grad: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype, in_place: bool = False
    ) -> torch.Tensor | None:
        """`where(window, grad.to(dtype), 0)` for the window bits of `clip_bits` on a tensor of `grad`'s shape and
        memory order: the select of `hardtanh_backward` (a NaN gradient outside the window gives 0); written into
        `grad` with `in_place` (where it has `dtype`)."""

    def scaled_sign(self, u: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """`(binary_sign(u) * scale.view(-1, 1)).to(dtype)` for a 2-D `u` and one scale per row (`+-scale` is exact
        before the one rounding)."""

    def clip_inplace(self, u: torch.Tensor, bound: float, mask: torch.Tensor | None = None) -> bool:
        """`u.clamp_(-bound, bound)` where the bool `mask` (of `u`'s shape) is True, everywhere without one, in place
        and in one read (writing only where an entry lies outside); False (nothing done) where it does not apply."""

    def binary_linear_applies(self, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether `binary_linear` can take `x` (or its sign written in `dtype`) and `weight`, as far as their
        types, devices, dtypes and the CPU tell (it may still answer None, on a NaN in `x`)."""

    def binary_linear(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """`scale_output(F.linear(binary_sign(x), binary_sign(weight).to(x.dtype)), scale, bias, 1)` without a
        graph (the factored form of a frozen linear layer, Eq. 5), from the signs of the latent `x` and `weight`:
        binary products, which are exact integers either way."""


_fused: FusedOps | None = None


def set_fused_ops(ops: FusedOps | None) -> FusedOps | None:
    """Use `ops` for the elementwise passes of this module (None: the torch ops alone); returns the previous ones.
    Process-wide."""
    global _fused
    previous, _fused = _fused, ops
    return previous


def fused_ops() -> FusedOps | None:
    """The fused passes in use (`set_fused_ops`), or None."""
    return _fused


def scaled_sign(u: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`(binary_sign(u) * scale.view(-1, 1)).to(dtype)` for a 2-D `u` (a linear weight) and one scale per row, in one
    pass where a fused one applies; without `scale`, `binary_sign(u).to(dtype)` for any `u`."""
    u = u.detach()
    if scale is None:
        if _fused is not None and (fused := _fused.sign(u, False, dtype)) is not None:
            return fused[0]
        return binary_sign(u).to(dtype)
    if _fused is not None and (fused := _fused.scaled_sign(u, scale, dtype)) is not None:
        return fused
    return (binary_sign(u) * scale.view(-1, 1)).to(dtype)


def clip_inplace_(u: torch.Tensor, bound: float, mask: torch.Tensor | None = None) -> None:
    """Clamp `u` to `[-bound, bound]` in place where `mask` is True (a bool tensor of `u`'s shape; everywhere without
    one): `u.clamp_(-bound, bound)`, or `u.copy_(where(mask, u.clamp(-bound, bound), u))`. One read-mostly pass
    where a fused one applies (BinaryConnect's clip of the latent weights, which is a no-op for most of them)."""
    if _fused is not None and _fused.clip_inplace(u, bound, mask):
        return
    if mask is None:
        u.clamp_(-bound, bound)
    else:
        u.copy_(torch.where(mask, u.clamp(-bound, bound), u))


def binary_linear_applies(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a kernel (`FusedOps.binary_linear`) can compute a frozen linear layer's product from `x` (or its
    sign written in `dtype`) and `weight`."""
    return _fused is not None and _fused.binary_linear_applies(x, weight, dtype)


def binary_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """`scale_output(F.linear(binary_sign(x), binary_sign(weight).to(x.dtype)), scale, bias, 1)` through a kernel,
    without a graph, or None where none applies (then the caller runs the torch ops)."""
    if _fused is None:
        return None
    return _fused.binary_linear(x.detach(), weight.detach(), scale, bias)


def binary_sign(u: torch.Tensor) -> torch.Tensor:
    """`sign` with `sign(0) = sign(-0.0) = +1` and `sign(NaN) = -1`: values in {-1, +1} with the dtype of `u`.

    Computed as `-1 + 2 * (u >= 0)`: the comparison written straight into a float tensor, then one in-place `add`
    of a 0-d `-1` (which aten treats as a scalar): two vectorized passes, exact (the values are -1 and 1), and on
    CPU 1.4-2x faster than `(u >= 0) * 2 - 1` in two in-place steps and many times faster than `torch.where` or a
    bool intermediate.
    """
    u = u.detach()
    if _fused is not None and (fused := _fused.sign(u, False)) is not None:
        return fused[0]
    out = torch.ge(u, 0, out=torch.empty_like(u))
    return torch.add(torch.full((), -1.0, dtype=u.dtype, device=u.device), out, alpha=2, out=out)


def sign_and_abs_sum(u: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(binary_sign(u).to(dtype), abs_sum(u))`, from one read of `u` where a fused pass applies (dtype None: `u`'s;
    the sign is exact in any floating dtype)."""
    if _fused is not None and (fused := _fused.sign(u.detach(), True, dtype)) is not None:
        return fused  # type: ignore[return-value]
    sign = binary_sign(u)
    return (sign if dtype is None else sign.to(dtype)), abs_sum(u)


#: Elements per chunk of `abs_sum`'s float32 casts (4 MiB of float32: they stay in the caches and the allocator's
#: free lists instead of faulting in fresh pages).
_ABS_SUM_CHUNK = 1 << 20


def abs_sum(x: torch.Tensor) -> torch.Tensor:
    """`x.abs().sum(dtype=torch.float32)`, the sum of |x| accumulated in float32 (a 0-d float32 tensor).

    The plain expression writes `|x|` into an activation-sized temporary, and for a bfloat16 / float16 `x` the sum
    first casts all of it to float32 (twice `x`'s size). In a training step on CPU those allocations cost more than
    the arithmetic (fresh pages fault in: 4.8 against 2.2 ms per step for a float32 activation of 4096 x 1536, 8.1
    against 1.5 ms in bfloat16). So on CPU the sum runs over chunks of `_ABS_SUM_CHUNK` elements, whose
    temporaries stay in the caches and the allocator's free lists; the chunk sums are added in float32, so the
    result may differ from one whole sum in the last bits. Float64 inputs, small or non-contiguous ones, tensor
    subclasses (a `DTensor`), other devices and `torch.compile` (which fuses the whole expression) take the plain
    expression. `vector_norm(x, 1)` needs no temporary but is 3-4x slower on CPU, its kernel not vectorized (an
    activation of 4096 x 1536: 9.3 against 2.6 ms in float32, 10.8 against 3.5 in bf16)."""
    x = x.detach()
    if _fused is not None and (fused := _fused.abs_sum(x)) is not None:
        return fused
    if (
        type(x) is not torch.Tensor  # a DTensor or another subclass: the global sum, as the subclass defines it
        or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or not x.is_cpu
        or x.numel() <= _ABS_SUM_CHUNK
        or not x.is_contiguous()
        or torch.compiler.is_compiling()
    ):
        return x.abs().sum(dtype=torch.float32)
    parts = [chunk.abs().sum(dtype=torch.float32) for chunk in x.view(-1).split(_ABS_SUM_CHUNK)]
    return torch.stack(parts).sum()


def _window(u: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`1{|u| <= bound}` as 0/1 floats of `dtype` (default `u`'s), the comparison written straight into them (a
    bool intermediate is much slower on CPU)."""
    u = u.detach()
    return torch.le(u.abs(), bound, out=torch.empty_like(u, dtype=dtype))


def _bound_on_host(bound: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether an op on `tensors` may read the 0-d `bound` back as a Python number: all of them on CPU, outside
    `torch.compile` (which must not read a tensor back to the host)."""
    return bound.numel() == 1 and all(t.is_cpu for t in tensors) and not torch.compiler.is_compiling()


def _window_edges(u: torch.Tensor, bound: torch.Tensor) -> tuple[float, float]:
    """`(lo, hi)`: one ulp outside `-bound, bound` rounded to `u`'s dtype, in float32 (float64 for a float64 `u`;
    bf16 / fp16 values are float32 values), so that `lo < u < hi` is `|u| <= bound` (no float lies between `bound`
    and the next one up)."""
    step = torch.float64 if u.dtype == torch.float64 else torch.float32
    b = bound.detach().reshape(()).to(u.dtype).to(step)
    hi = float(torch.nextafter(b, torch.tensor(math.inf, dtype=step)))
    lo = float(torch.nextafter(-b, torch.tensor(-math.inf, dtype=step)))
    return lo, hi


def _windowed_grad(
    grad: torch.Tensor,
    u: torch.Tensor,
    bound: torch.Tensor,
    multiplier: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """`_window(u, bound, grad.dtype).mul_(grad)`, the clipped-identity gradient `1{|u| <= bound} * grad`, with the
    same values (a zero may come out as +0.0 where the product gave -0.0) in one pass on CPU: aten's fused
    `hardtanh_backward`, which passes `grad` strictly inside `(lo, hi)` (`_window_edges`), so the window keeps its
    closed ends (a NaN `u` is outside, as for the comparison). 4-7x faster than the comparison, product and
    temporaries. Elsewhere (another device, under `torch.compile`, which must not read `bound` back to the host)
    the product.

    With a 0-d `multiplier` the result is then multiplied by it in place (`.mul_(multiplier)`); a fused pass
    (`FusedOps.windowed_grad`) does both in one. `in_place`: the result may be written into `grad` (a gradient
    that its backward owns, `_overwritable`), which saves an activation-sized allocation per layer and step.

    The result has `u`'s dtype: a gradient of another dtype (an autocast op's bfloat16 gradient of a float32 input)
    is cast first, in the same pass where a fused one applies."""
    on_host = _bound_on_host(bound, u, grad)
    if on_host:
        lo, hi = _window_edges(u, bound)
        # the fused pass takes both dtypes, and writes into `grad` only where it has u's
        fused = None if _fused is None else _fused.windowed_grad(grad, u.detach(), lo, hi, multiplier, in_place)
        if fused is not None:
            return fused
    if grad.dtype != u.dtype:
        grad, in_place = grad.to(u.dtype), True  # the cast is a fresh tensor
    if not on_host:
        out = _window(u, bound, grad.dtype).mul_(grad)
    else:
        if in_place:
            out = torch.ops.aten.hardtanh_backward.grad_input(grad, u.detach(), lo, hi, grad_input=grad)
        else:
            out = torch.ops.aten.hardtanh_backward(grad, u.detach(), lo, hi)
    return out if multiplier is None else out.mul_(multiplier)


def _overwritable(owned: bool, grad: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether a binarizer's backward may write its input gradient into `grad`: the caller said the gradient is
    the fresh result of one op's backward that nothing else holds (`owned`: `hard_sign`'s `owned_grad`), and it is
    a plain dense tensor of the dtype and shape of the gradient it gives (`like`'s) that no graph records (a double
    backward would read it again)."""
    return (
        owned
        and type(grad) is torch.Tensor
        and not grad.requires_grad
        and grad.dtype == like.dtype
        and grad.shape == like.shape
        and (grad.is_contiguous() or (grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last)))
    )


def _window_int8(u: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """`_window(u, bound).to(torch.int8)`, on CPU as `_windowed_grad` of a gradient of ones (a broadcast 0-d
    tensor, so nothing activation-sized is read for it): two passes instead of four (|u|, the comparison, the
    cast), 2-4x faster on this project's CPUs. A NaN `u` is outside the window, as for the comparison."""
    if not _bound_on_host(bound, u):
        return _window(u, bound).to(torch.int8)
    ones = torch.ones((), dtype=u.dtype, device=u.device).expand_as(u)
    return _windowed_grad(ones, u, bound).to(torch.int8)


def clamp_to(u: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`clamp(u, -bound, bound).to(dtype)` for a 0-d `bound` of `u`'s dtype (dtype None: `u`'s). On CPU (outside
    `torch.compile`, which must not read `bound` back to the host) the bound is read back as a Python number, which
    gives the same values: a clamp to scalars is one plain vectorized pass, while tensor bounds go through aten's
    broadcasting three-input kernel, 2.5x (float32) to 15x (bfloat16) slower on this project's CPUs (an activation
    of 4096 x 1536). A fused pass writes a float32 `u`'s clamp straight into bfloat16 (the operand of an autocast
    op)."""
    if _bound_on_host(bound, u, bound):
        b = bound.item()
        if dtype not in (None, u.dtype) and _fused is not None:
            fused = _fused.masked(u.detach(), None, 0.0, b, None, dtype)
            if fused is not None:
                return fused[0]
        out = torch.clamp(u, -b, b)
    else:
        out = torch.clamp(u, -bound, bound)
    return out if dtype is None else out.to(dtype)


def _masked_values(u, mask, scale, bound, clip_smooth: bool) -> torch.Tensor:
    """`where(M, a * sign(u), smooth(u))`: the forward of `_MaskedBinarize`, and all of it where no gradient is
    taken (`no_grad`, `inference_mode`, a `u` that needs none), which then keeps no window.

    `a * sign(u)` and the `where` are written into the sign's own tensor (one activation-sized allocation instead
    of three) wherever that gives the dtype and shape of the out-of-place ops."""
    if clip_smooth and (fused := _fused_masked(u, mask, scale, bound, window=False)) is not None:
        return fused[0]
    hard = binary_sign(u)
    soft = clamp_to(u, bound) if clip_smooth else u
    if isinstance(scale, torch.Tensor) and (
        torch.result_type(hard, scale) != hard.dtype or torch.broadcast_shapes(hard.shape, scale.shape) != hard.shape
    ):
        hard = hard * scale
    elif not (isinstance(scale, float) and scale == 1.0):
        hard.mul_(scale)
    if torch.broadcast_shapes(mask.shape, hard.shape, soft.shape) != hard.shape or soft.dtype != hard.dtype:
        return torch.where(mask, hard, soft)
    return torch.where(mask, hard, soft, out=hard)


def _fused_masked(
    u, mask, scale, bound, window: bool, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`(_masked_values(u, mask, scale, bound, True), _window_int8(u, bound) if window else None)` from one fused
    pass (`FusedOps.masked`), or None where it does not apply: the scale and the bound must be numbers or 0-d
    tensors that leave the result in `u`'s dtype (the bound of `u`'s dtype, as `masked_binarize` casts it)."""
    if _fused is None or not isinstance(bound, torch.Tensor) or bound.dtype != u.dtype or not _bound_on_host(bound, u):
        return None
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or not scale.is_cpu or torch.result_type(u, scale) != u.dtype:
            return None
        value = scale.item()
    else:
        value = float(scale)
    edges = _window_edges(u, bound) if window else None
    return _fused.masked(u.detach(), mask, value, bound.item(), edges, dtype)


class _MaskedBinarize(torch.autograd.Function):
    """Forward `where(M, a * sign(u), smooth(u))`; backward as in the module docstring.

    Inputs (`clip_smooth`) keep only the int8 window `1{|u| <= c}` for the backward pass (one byte per entry instead
    of `u`'s four), plus the mask under "stompp". Weights keep the mask under "stompp" and nothing under
    "stompp_ste", whose weight gradient is the identity everywhere (BinaryConnect's STE on frozen entries).
    """

    @staticmethod
    def forward(ctx, u, mask, scale, bound, clip_smooth, ste_on_frozen, owned_grad, dtype):  # type: ignore[override]
        # the window as int8: one byte per entry, and casts to and from int8 are cheap (bool ones are not)
        fused = _fused_masked(u, mask, scale, bound, window=True, dtype=dtype) if clip_smooth else None
        if fused is not None:
            out, window = fused
        else:
            window = _window_int8(u, bound) if clip_smooth else None
            out = _masked_values(u, mask, scale, bound, clip_smooth)
            out = out if dtype is None else out.to(dtype)
        ctx.save_for_backward(None if ste_on_frozen else mask, window)
        ctx.clip_smooth = clip_smooth
        ctx.ste_on_frozen = ste_on_frozen
        ctx.owned_grad = owned_grad
        ctx.like = torch.empty((), dtype=u.dtype).expand(u.shape)  # the gradient's dtype and shape, no memory
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        mask, window = ctx.saved_tensors
        in_place = _overwritable(ctx.owned_grad, grad, ctx.like)
        if ctx.clip_smooth and ctx.ste_on_frozen and _fused is not None and not torch.compiler.is_compiling():
            # the window alone, in one pass (an autocast op's gradient widened in it)
            fused = _fused.window_apply(grad, window, ctx.like.dtype, in_place)
            if fused is not None:
                return fused, None, None, None, None, None, None, None
        if grad.dtype != ctx.like.dtype:
            grad, in_place = grad.to(ctx.like.dtype), True  # an autocast op's gradient: the cast is a fresh tensor
        grad = _masked_grad(grad, mask, window, ctx.clip_smooth, ctx.ste_on_frozen, in_place)
        return grad, None, None, None, None, None, None, None


def _masked_grad(grad, mask, window, clip_smooth: bool, ste_on_frozen: bool, in_place: bool = False) -> torch.Tensor:
    """The input gradient of `_MaskedBinarize`: grad times a 0/1 factor built with float arithmetic (no `where`,
    no bool tensors: both are slow on CPU). `window` is the int8 `1{|u| <= c}` of an input (None for a weight).
    `in_place`: the product may be written into `grad` (`_overwritable`)."""
    if ste_on_frozen and not clip_smooth:  # weights: the identity everywhere (BinaryConnect's STE on frozen entries)
        return grad
    if clip_smooth and ste_on_frozen:  # inputs: 1{|u| <= c} everywhere
        factor = window.to(grad.dtype)
    elif clip_smooth:  # inputs: 1{|u| <= c} on continuous entries, 0 on frozen ones
        factor = window.to(grad.dtype) * (1 - mask.to(grad.dtype))
    else:  # weights: 1 on continuous entries, 0 on frozen ones
        factor = 1 - mask.to(grad.dtype)
    return grad.mul_(factor) if in_place else grad * factor


class _HardSign(torch.autograd.Function):
    """Every entry frozen, STE gradient: forward `v * sign(u)`, backward `1{|u| <= c} * g / s` for an input (clip
    bound `c`), `g / s` for a weight (bound None: BinaryConnect's identity).

    `v` is the magnitude of the output (the scale `a`, or None for +-1 when the scale is applied to the layer output
    instead) and `s` what the gradient is divided by to stay the gradient with respect to `a * sign(u)` (None, or
    `a` when the output is `sign(u)` and `a` multiplies the layer output). With a bound it saves `u` itself, which
    the layer keeps anyway (an input that the layer's op recomputes its operand from), and rebuilds the window in
    the backward pass; without one it saves only `s`.
    """

    @staticmethod
    def forward(ctx, u, value, bound, grad_divisor, precomputed, owned_grad):  # type: ignore[override]
        ctx.save_for_backward(u if bound is not None else None, bound, grad_divisor)
        ctx.owned_grad = owned_grad
        sign = binary_sign(u) if precomputed is None else precomputed[0]
        return sign if value is None else sign * value

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        u, bound, divisor = ctx.saved_tensors
        none = (None,) * 5
        if bound is None:  # a weight: the identity (divided by the scale in the factored form)
            return (grad if divisor is None else grad / divisor.to(grad.dtype)), *none
        in_place = _overwritable(ctx.owned_grad, grad, u)
        # (1 / divisor) * grad inside the window, rounded as the window divided by the divisor times grad
        multiplier = None if divisor is None else torch.reciprocal(divisor.to(grad.dtype))
        return _windowed_grad(grad, u, bound, multiplier, in_place), *none


class _Clip(torch.autograd.Function):
    """`clamp(u, -c, c)` with gradient `1{|u| <= c} * g`, computed with float comparisons (torch's own clamp
    backward goes through bool masks, `where` and `masked_fill`, several times slower on CPU). For a float32 `u`
    where a fused pass applies (`FusedOps.clip_bits`) it saves the window as one bit per entry, written by the
    clamp's own pass. Saves `u` itself otherwise, and rebuilds the window from it."""

    @staticmethod
    def forward(ctx, u, bound, owned_grad, dtype):  # type: ignore[override]
        fused = None
        # float32 u only: the backward then reads 1 bit per entry instead of 32; for a bfloat16 u (16) writing the
        # bits costs the forward more than the backward saves (measured on the AMX Xeon)
        if _fused is not None and u.dtype == torch.float32 and _bound_on_host(bound, u, bound):
            fused = _fused.clip_bits(u.detach(), bound.item(), _window_edges(u, bound), dtype)
        if fused is not None:
            out, bits = fused
            ctx.save_for_backward(None, bound, bits)
        else:
            out = clamp_to(u, bound, dtype)
            ctx.save_for_backward(u, bound, None)
        ctx.owned_grad = owned_grad
        ctx.like = torch.empty((), dtype=u.dtype).expand(u.shape)  # the gradient's dtype and shape, no memory
        ctx.strides = u.stride()  # the bits follow u's memory order (contiguous or channels-last)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        u, bound, bits = ctx.saved_tensors
        in_place = _overwritable(ctx.owned_grad, grad, ctx.like)
        if bits is None:
            return _windowed_grad(grad, u, bound, in_place=in_place), None, None, None
        dtype = ctx.like.dtype
        if _fused is not None and grad.stride() == ctx.strides:
            fused = _fused.bits_grad(grad, bits, dtype, in_place)
            if fused is not None:
                return fused, None, None, None
        # a gradient the pass does not take (another layout or type): the window unpacked in torch
        window = _unpack_window(bits, ctx.like.shape, ctx.strides)
        return torch.where(window, grad.to(dtype), torch.zeros((), dtype=dtype)), None, None, None


def _unpack_window(bits: torch.Tensor, shape: torch.Size, strides: tuple[int, ...]) -> torch.Tensor:
    """The bool window of `FusedOps.clip_bits` for a tensor of `shape` and `strides` (dense: its memory order)."""
    numel = math.prod(shape)
    flat = unpack_signs(bits.view(1, -1), numel).view(-1) if numel else torch.zeros(0, dtype=torch.bool)
    order = sorted(range(len(shape)), key=lambda d: -strides[d])  # dimensions from the outermost in memory
    return flat.view([shape[d] for d in order]).permute([order.index(d) for d in range(len(shape))])


def clip(
    u: torch.Tensor, bound: torch.Tensor, owned_grad: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`clamp(u, -bound, bound)` (a 0-d `bound`), with the fast backward of `_Clip` when autograd tracks `u`.
    `owned_grad` as for `hard_sign`; `dtype`: the result's (None: `u`'s), the operand dtype of the autocast op it
    feeds, and the backward takes that op's gradient in that dtype."""
    if u.requires_grad and torch.is_grad_enabled():
        return _Clip.apply(u, bound, owned_grad, dtype)
    return clamp_to(u, bound, dtype)


def hard_sign(
    u: torch.Tensor,
    *,
    ste: bool,
    scale: torch.Tensor | float = 1.0,
    bound: torch.Tensor | float | None = None,
    factored: bool = False,
    sign: torch.Tensor | None = None,
    owned_grad: bool = False,
) -> torch.Tensor:
    """A fully frozen tensor: `scale * sign(u)`, or `sign(u)` alone when `factored` (the caller multiplies the
    layer output by `scale`, which keeps binary x binary products exact integers, docs/design.md "Core").
    `sign` is `binary_sign(u)` when the caller has it already (a fresh tensor that nothing else holds, from
    `sign_and_abs_sum`): it is then used, and may be returned, instead of a second pass over `u`.
    `owned_grad`: the result feeds one op (a layer's matmul or convolution) and nothing else, so the gradient that
    reaches it is that op's fresh input gradient, which the backward may overwrite instead of allocating another
    (docs/design.md, "Fused passes"). Leave it False for a result that the caller hands on.

    With `ste` (rules 'ste' and 'stompp_ste') the gradient is the straight-through one: the gradient with respect to
    `scale * sign(u)` (so the factored form divides by `scale`; a zero scale, e.g. an all-zero weight row, passes no
    gradient), times `1{|u| <= bound}` for an input (BinaryNet's clipped identity), unclipped for a weight
    (`bound=None`, BinaryConnect's identity). Without `ste` ('stompp') the result is a constant.
    """
    if isinstance(scale, torch.Tensor):
        scale = scale.detach()
    unit = isinstance(scale, float) and scale == 1.0
    value = None if factored or unit else scale
    if not (ste and u.requires_grad and torch.is_grad_enabled()):
        sign = binary_sign(u) if sign is None else sign
        return sign if value is None else sign * value
    divisor = None
    if factored and not unit:
        divisor = torch.as_tensor(scale, dtype=u.dtype, device=u.device)
        divisor = torch.where(divisor > 0, divisor, torch.inf)
    if bound is not None:
        bound = torch.as_tensor(bound, dtype=u.dtype, device=u.device).detach()
    return _HardSign.apply(u, value, bound, divisor, None if sign is None else (sign,), owned_grad)


def masked_binarize(
    u: torch.Tensor,
    mask: torch.Tensor | bool,
    *,
    rule: str,
    scale: torch.Tensor | float = 1.0,
    bound: torch.Tensor | float = 1.0,
    clip_smooth: bool,
    owned_grad: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Binarize `u` under `mask` with the training `rule` ('stompp', 'stompp_ste' or 'ste').

    Args:
        u: the latent tensor.
        mask: a bool tensor broadcastable to `u` (True = frozen to sign), or a Python bool for an all-frozen /
            all-continuous tensor, which takes a fast path that allocates no mask.
        rule: the gradient rule. 'ste' ignores `mask` (hard sign everywhere).
        scale: multiplies sign(u); detached, so it is a constant in the backward pass.
        bound: inputs only: the clip bound `c` (see the module docstring); detached. Ignored for weights.
        clip_smooth: True for inputs (smooth = clamp to [-c, c], STE `1{|u| <= c} * g`), False for weights (smooth
            = identity, STE the identity `g`: BinaryConnect).
        owned_grad: the backward may overwrite the gradient it receives (`hard_sign`).
        dtype: a continuous or transitioning input's result dtype, where it feeds an autocast op (`clip`); None:
            `u`'s.
    """
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {', '.join(map(repr, RULES))}, but got {rule!r}.")
    if isinstance(scale, torch.Tensor):
        scale = scale.detach()
    if rule == "ste":
        mask = True
    if not clip_smooth:
        bound = None  # weights: no clip window (BinaryConnect's identity STE)
        dtype = None  # and their own dtype (autocast casts a weight once per forward, and caches the cast)
    if mask is True:
        out = hard_sign(u, ste=rule != "stompp", scale=scale, bound=bound, owned_grad=owned_grad)
        return out if dtype is None else out.to(dtype)
    if mask is False:
        if not clip_smooth:
            return u
        return clip(u, torch.as_tensor(bound, dtype=u.dtype, device=u.device).detach(), owned_grad, dtype)
    if bound is not None:
        bound = torch.as_tensor(bound, dtype=u.dtype, device=u.device).detach()
    if not (u.requires_grad and torch.is_grad_enabled()):  # no backward: the same values, no window
        out = _masked_values(u, mask, scale, bound, clip_smooth)
        return out if dtype is None else out.to(dtype)
    return _MaskedBinarize.apply(u, mask, scale, bound, clip_smooth, rule != "stompp", owned_grad, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Under `torch.compile`: the masked binarize of a progressive tensor as operators that read the mask state when they
# run, not when they are traced (docs/design.md, "torch.compile").


def state_binarize(
    u: torch.Tensor,
    state: MaskState,
    *,
    rule: str,
    scale: torch.Tensor | float = 1.0,
    bound: torch.Tensor | float = 1.0,
    clip_smooth: bool,
    group: Sequence[int] | None = None,
    forced: bool = False,
) -> torch.Tensor:
    """What eager mode computes for `u` under the mask of `state`, as one operator that looks the mask up (by
    `state.handle`) when it runs.

    `masked_binarize` and the layers branch in Python on the mask (the constants False / True, or a bool tensor),
    so a graph traced through them is specialized to every mask of the model and `torch.compile` would recompile at
    each stage transition. This operator is opaque to the compiler and its arguments do not change with the state
    (the tensor, scale and clip bound, the state's fixed integer handle), so one graph serves the whole progression,
    and constant masks stay Python constants: nothing is allocated for them.

    Args:
        group: the handles of a layer's binarized tensors when the layer takes the factored form once all of them
            are frozen (docs/design.md, Eq. 5; `layer_frozen`): then the result is `sign(u)` and the caller multiplies
            the layer output by the scales. None: never factored (a StoMPP activation).
        forced: this tensor counts as frozen whatever its mask (`binarized(model)`); it is then not in `group`.

    The values and input gradients are eager mode's, entry for entry, with one difference: a frozen tensor under
    'stompp' gets an exactly zero gradient where eager mode gives none at all. The backward pass reads the state
    again, so masks must not move between a forward and its backward (`ProgressionController.advance` runs after
    the optimizer step); it raises if this tensor's mask did.
    """
    if isinstance(scale, torch.Tensor):
        scale = scale.detach()
    else:
        scale = None if scale == 1.0 else torch.as_tensor(scale, device=u.device)
    bound = torch.as_tensor(bound, dtype=u.dtype, device=u.device).detach() if clip_smooth else None
    factorable = group is not None
    return torch.ops.stompp_hf.state_binarize(
        u, scale, bound, state.handle, rule, clip_smooth, list(group or ()), factorable, forced
    )


def layer_frozen(like: torch.Tensor, group: Sequence[int]) -> torch.Tensor:
    """A 0-d bool tensor on `like`'s device: whether every mask of `group` (handles) is the constant True, i.e. the
    layer takes the factored form (Eq. 5) in this forward. Read when the operator runs, like `state_binarize`."""
    return torch.ops.stompp_hf.layer_frozen(like.detach(), list(group))


def _all_frozen(group) -> bool:
    return all(MaskState.from_handle(h).value is True for h in group)


def _with_layout_of(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`out` with the strides of `torch.empty_like(like)`, the layout the operators declare to the compiler."""
    if out.stride() == torch.empty_like(like, device="meta").stride():
        return out
    return torch.empty_like(like).copy_(out)


_SCHEMA = "Tensor? bound, int handle, str rule, bool clip_smooth, int[] group, bool factorable, bool forced"


@torch.library.custom_op(
    "stompp_hf::state_binarize",
    mutates_args=(),
    schema=f"(Tensor u, Tensor? scale, {_SCHEMA}) -> Tensor",
    tags=(torch.Tag.cudagraph_unsafe,),  # reads the mask state when it runs, which a CUDA graph replay would not
)
def _state_binarize_op(u, scale, bound, handle, rule, clip_smooth, group, factorable, forced):
    state = MaskState.from_handle(handle)
    state.compiled_token = state.state_token()
    mask = True if forced else state.value
    if mask is True:  # as `hard_sign`: `sign(u)` in the factored form, else `scale * sign(u)`
        sign = binary_sign(u)
        out = sign if scale is None or (factorable and _all_frozen(group)) else sign * scale
    elif mask is False:  # as `clip`, or the identity for a weight
        out = clamp_to(u, bound) if clip_smooth else u.clone()
    else:  # as `_MaskedBinarize`
        out = _masked_values(u, mask, 1.0 if scale is None else scale, bound, clip_smooth)
    return _with_layout_of(out, u)


@_state_binarize_op.register_fake
def _(u, scale, bound, handle, rule, clip_smooth, group, factorable, forced):
    return torch.empty_like(u)


@torch.library.custom_op(
    "stompp_hf::state_binarize_backward",
    mutates_args=(),
    schema=f"(Tensor grad, Tensor u, Tensor? scale, {_SCHEMA}) -> Tensor",
    tags=(torch.Tag.cudagraph_unsafe,),
)
def _state_binarize_backward_op(grad, u, scale, bound, handle, rule, clip_smooth, group, factorable, forced):
    state = MaskState.from_handle(handle)
    if state.state_token() != state.compiled_token:
        raise RuntimeError(
            "A StoMPP mask changed between a compiled forward pass and its backward pass (the masks were advanced "
            "or restored in between), so its gradient would use the new mask. Move masks only after the backward."
        )
    mask, ste = (True if forced else state.value), rule != "stompp"
    if mask is True:
        if not ste:  # 'stompp': a frozen entry passes no gradient (eager mode: none at all)
            return torch.zeros_like(grad)
        divisor = None  # as `_HardSign`'s backward: the factored form divides by the scale (a zero one passes none)
        if scale is not None and factorable and _all_frozen(group):
            divisor = torch.as_tensor(scale, dtype=u.dtype, device=u.device)
            divisor = torch.where(divisor > 0, divisor, torch.inf)
        if bound is None:  # a weight: BinaryConnect's identity
            out = grad.clone() if divisor is None else grad / divisor.to(grad.dtype)
        else:
            out = _window(u, bound, grad.dtype)
            if divisor is not None:
                out.div_(divisor)
            out.mul_(grad)
    elif mask is False:  # as `_Clip`'s backward, or the identity for a weight
        out = _window(u, bound, grad.dtype).mul_(grad) if clip_smooth else grad.clone()
    else:  # as `_MaskedBinarize`'s backward
        window = _window(u, bound).to(torch.int8) if clip_smooth else None
        out = _masked_grad(grad, mask, window, clip_smooth, ste)
        out = grad.clone() if out is grad else out
    return _with_layout_of(out, grad)


@_state_binarize_backward_op.register_fake
def _(grad, u, scale, bound, handle, rule, clip_smooth, group, factorable, forced):
    return torch.empty_like(grad)


def _state_binarize_setup(ctx, inputs, output) -> None:
    u, scale, bound, *ctx.args = inputs
    ctx.save_for_backward(u, scale, bound)


def _state_binarize_grad(ctx, grad):
    du = None
    if ctx.needs_input_grad[0]:
        du = torch.ops.stompp_hf.state_binarize_backward(grad, *ctx.saved_tensors, *ctx.args)
    return du, None, None, None, None, None, None, None, None


_state_binarize_op.register_autograd(_state_binarize_grad, setup_context=_state_binarize_setup)


@torch.library.custom_op(
    "stompp_hf::layer_frozen",
    mutates_args=(),
    schema="(Tensor like, int[] group) -> Tensor",
    tags=(torch.Tag.cudagraph_unsafe,),
)
def _layer_frozen_op(like, group):
    return torch.full((), _all_frozen(group), dtype=torch.bool, device=like.device)


@_layer_frozen_op.register_fake
def _(like, group):
    return torch.empty((), dtype=torch.bool, device=like.device)


def output_scale(
    input_scale: torch.Tensor | float | None, weight_scale: torch.Tensor | float | None, feature_ndim: int
) -> torch.Tensor | float | None:
    """The factor a binary layer's output is multiplied by: `beta * alpha`, shaped to broadcast over the output
    channels (dimension -1 for linear, 1 for conv2d). Training and packed modules compute it the same way."""
    beta = input_scale if isinstance(input_scale, torch.Tensor) else None
    alpha = weight_scale.reshape(-1) if isinstance(weight_scale, torch.Tensor) else None
    if alpha is None:
        return beta
    scale = alpha if beta is None else beta * alpha
    return scale.view(-1, *([1] * (feature_ndim - 1)))


def scale_output(
    y: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, feature_ndim: int
) -> torch.Tensor:
    """`y * scale + bias` as two separately rounded operations (the XNOR kernel computes the same), in `y`'s dtype:
    under autocast a binarized layer's output has the autocast dtype, as the `F.linear` / conv it replaces (a
    float32 bias would promote it, and every op downstream would run in float32).

    `y` must be the fresh output of the layer's op, which nothing else holds: it is updated in place (autograd
    allows it, since neither a matmul nor a convolution saves its output), which saves two output-sized
    allocations, each of which costs more than the arithmetic on CPU (fresh pages fault in). Where a fused pass
    applies (a linear layer's output: channels in the last dimension) both are one pass over `y`."""
    if scale is not None:
        scale = scale.to(y.dtype)
    if bias is not None:
        bias = bias.to(y.dtype)
    if (
        feature_ndim == 1
        and _fused is not None
        and (scale is not None or bias is not None)
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (y, scale, bias)))
        and _fused.scale_bias(y, scale, bias)  # (autograd does not see it: only where it records nothing)
    ):
        return y
    if scale is not None:
        y = y.mul_(scale)
    if bias is not None:
        y = y.add_(bias.view(-1, *([1] * (feature_ndim - 1))))
    return y
