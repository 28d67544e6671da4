"""The factored form of a frozen linear layer (docs/design.md, Eq. 5) as one autograd node, its backward written out.

Written as separate ops, a frozen layer's training step is `sign(x)`, `sign(W)`, the matmul, `y * s` in place and
`+ b`, and autograd runs their backward: `g * s` (an output-sized product), the matmul's two products, then each
sign's straight-through gradient, divided by its own scale. The scales cancel: the gradient with respect to
`beta * sign(x)` is `g @ (alpha * sign(W))` and the one with respect to `alpha * sign(W)` is
`beta * g^T @ sign(x)`. `factored_linear` computes these directly, scaling the small weight-shaped operands instead
of the output-sized gradient, and writes the input's window into the matmul's own result (docs/design.md, "Frozen
layers: the factored form"). The forward is the same ops on the same operands, so its values are the same bits;
the gradients are the same values up to the rounding of the scales' products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .functional import (
    _overwritable,
    _windowed_grad,
    binary_linear,
    binary_sign,
    output_scale,
    scale_output,
    scaled_sign,
)


class _FactoredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, x_sign, w_sign, beta, alpha, bound, x_ste, w_ste):  # type: ignore[override]
        x_binary, w_binary = x_sign is not x, w_sign is not weight
        cast = None  # under autocast, the binary input in the autocast dtype, which the weight gradient reads
        if x_sign is not None and x_binary and torch.is_autocast_enabled(x.device.type):
            cast = x_sign = x_sign.to(torch.get_autocast_dtype(x.device.type))  # no copy if it has it already
        scale = output_scale(beta, alpha, 1)
        y = None
        if w_sign is None:  # the caller found a kernel for the binary product (`binary_linear_applies`)
            y = binary_linear(x if x_sign is None else x_sign, weight, scale, bias)
            if y is None:  # it did not take these values after all (a NaN in x)
                x_sign = binary_sign(x) if x_sign is None else x_sign
                w_sign = binary_sign(weight)
        if y is None:
            # the forward of the unfused layer, op for op (autocast applies to `F.linear` here as there)
            y = scale_output(F.linear(x_sign, w_sign), scale, bias, 1)
        ctx.save_for_backward(x, weight, beta, alpha, bound, cast)
        ctx.flags = (x_binary, w_binary, x_ste, w_ste, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, beta, alpha, bound, cast = ctx.saved_tensors
        x_binary, w_binary, x_ste, w_ste, bias_dtype = ctx.flags
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0] and x_ste:
            # alpha * sign(W) in the gradient's dtype, in one pass where a fused one applies
            w = scaled_sign(weight, alpha, g.dtype) if w_binary else weight.detach().to(g.dtype)
            gx = (g @ w).view(*grad.shape[:-1], w.shape[1])
            if x_binary:  # the clipped identity of the input, times 0 for a zero beta (no gradient, as unfused);
                # an autocast gradient is widened to x's dtype in the same pass
                gx = _windowed_grad(gx, x, bound, _zero_if_zero(beta, x), _overwritable(True, gx, x))
            else:
                gx = gx.to(x.dtype)
        if ctx.needs_input_grad[1] and w_ste:
            # kept in the autocast dtype as the unfused matmul keeps its cast operand (half the float32 sign's
            # memory, and no recomputation and cast in the backward); recomputed otherwise
            xs = cast if cast is not None else binary_sign(x) if x_binary else x.detach()
            gw = g.t() @ xs.reshape(-1, xs.shape[-1]).to(g.dtype)
            if beta is not None:
                gw = gw.mul_(beta.to(gw.dtype))
            if alpha is not None and not _all_positive(alpha):
                # a zero alpha (an all-zero weight row) passes no gradient, as unfused (a product with 1 is exact)
                gw = gw.mul_((alpha > 0).view(-1, 1).to(gw.dtype))
            gw = gw.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = g.sum(0).to(bias_dtype)
        return gx, gw, gb, None, None, None, None, None, None, None


def _all_positive(alpha: torch.Tensor) -> bool:
    """Whether every weight scale is positive, read back on CPU (then the weight gradient's 0/1 row factor is all
    ones and needs no pass); False elsewhere and under `torch.compile`, which take the product."""
    return alpha.is_cpu and not torch.compiler.is_compiling() and bool((alpha > 0).all())


def _zero_if_zero(beta: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The window's multiplier for an input scale `beta`: None (1) unless beta is 0, then a 0-d zero. On CPU the
    test reads beta back (no multiplication pass for the usual positive beta); elsewhere a 0-d 0/1 factor."""
    if beta is None:
        return None
    if beta.is_cpu and not torch.compiler.is_compiling():
        return None if beta.item() > 0 else torch.zeros((), dtype=like.dtype)
    return (beta > 0).to(like.dtype)


def factored_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x_sign: torch.Tensor,
    w_sign: torch.Tensor,
    beta: torch.Tensor | None,
    alpha: torch.Tensor | None,
    bound: torch.Tensor | None,
    x_ste: bool,
    w_ste: bool,
) -> torch.Tensor:
    """`F.linear(x_sign, w_sign) * (beta * alpha) + bias` (Eq. 5), with the straight-through gradients of Eq. 3.

    Args:
        x, weight: the latent input and weight (what the gradients are for).
        x_sign, w_sign: `sign(x)` / `sign(W)` without a graph, or `x` / `weight` itself where that tensor is not
            binarized (then its gradient is the plain one). `w_sign` None: both are binarized and a kernel computes
            the product from the signs of `x` (or `x_sign`, the autocast operand, where given) and `weight`
            (`functional.binary_linear`); `x_sign` may then be None too (the kernel reads `x`'s signs itself).
        beta: the 0-d input scale in `x`'s dtype, alpha the per-output-channel weight scale; None where off.
        bound: the 0-d clip bound `c` of a binarized input, in `x`'s dtype (its STE window is `|x| <= c`).
        x_ste, w_ste: whether the frozen tensor passes the straight-through gradient ('ste', 'stompp_ste'); False
            for a 'stompp' one, a constant.
    """
    return _FactoredLinear.apply(x, weight, bias, x_sign, w_sign, beta, alpha, bound, x_ste, w_ste)
