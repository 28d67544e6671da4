"""The masked binarize, implemented once and shared by every layer type (DESIGN.md §1).

For a tensor `u` (a weight or a layer input), a boolean mask `M` (True = frozen), a scale `a` (a constant in the
backward pass) and a clip bound `c`::

    forward    u' = M * a * sign(u) + (1 - M) * smooth(u)         smooth(u) = clamp(u, -c, c)  for inputs,
                                                                             u                 for weights
    "stompp"      du = (1 - M) * g * smooth'(u)                    (Eq. 2 of the StoMPP paper: no STE at all)
    "stompp_ste"  du = (1 - M) * g * smooth'(u) + M * g * 1{|u| <= c}   (STE on frozen entries only)
    "ste"         M = 1 everywhere, du = g * 1{|u| <= c}           (BinaryConnect / clipped-identity STE)

`smooth'(u)` is `1{|u| <= c}` for inputs and `1` for weights; `c` is the activation scale beta (1 without
activation scaling) for inputs and 1 for weights (BinaryConnect's latent clip). `sign(0) = +1` everywhere in this
library, so that every binary value is in {-1, +1}.
"""

from __future__ import annotations

import torch


def binary_sign(u: torch.Tensor) -> torch.Tensor:
    """`sign` with `sign(0) = +1`: values in {-1, +1} with the dtype of `u`."""
    return torch.where(u >= 0, 1.0, -1.0).to(u.dtype)


class _MaskedBinarize(torch.autograd.Function):
    """Forward `where(M, a * sign(u), smooth(u))`; backward as in the module docstring."""

    @staticmethod
    def forward(ctx, u, mask, scale, bound, clip_smooth: bool, ste_on_frozen: bool):  # type: ignore[override]
        hard = binary_sign(u) * scale
        soft = torch.clamp(u, -bound, bound) if clip_smooth else u
        ctx.save_for_backward(u, mask, bound)
        ctx.clip_smooth = clip_smooth
        ctx.ste_on_frozen = ste_on_frozen
        return torch.where(mask, hard, soft)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        u, mask, bound = ctx.saved_tensors
        inside = (u >= -bound) & (u <= bound)
        zero = grad.new_zeros(())
        smooth_grad = torch.where(inside, grad, zero) if ctx.clip_smooth else grad
        frozen_grad = torch.where(inside, grad, zero) if ctx.ste_on_frozen else zero
        return torch.where(mask, frozen_grad, smooth_grad), None, None, None, None, None


def masked_binarize(
    u: torch.Tensor,
    mask: torch.Tensor | bool,
    *,
    rule: str,
    scale: torch.Tensor | float = 1.0,
    bound: torch.Tensor | float = 1.0,
    clip_smooth: bool,
) -> torch.Tensor:
    """Binarize `u` under `mask` with the training `rule` ('stompp', 'stompp_ste' or 'ste').

    Args:
        u: the latent tensor.
        mask: a bool tensor broadcastable to `u` (True = frozen to sign), or a Python bool for an all-frozen /
            all-continuous tensor, which takes a fast path that allocates no mask.
        rule: the gradient rule. 'ste' ignores `mask` (hard sign everywhere).
        scale: multiplies sign(u); detached, so it is a constant in the backward pass.
        bound: the clip bound `c` (see the module docstring); detached.
        clip_smooth: True for inputs (smooth = clamp to [-c, c]), False for weights (smooth = identity).
    """
    if rule not in ("stompp", "stompp_ste", "ste"):
        raise ValueError(f"`rule` must be one of 'stompp', 'stompp_ste', 'ste', but got {rule!r}.")
    if isinstance(scale, torch.Tensor):
        scale = scale.detach()
    bound = torch.as_tensor(bound, dtype=u.dtype, device=u.device).detach()
    if rule == "ste":
        mask = True
    if mask is False:
        return torch.clamp(u, -bound, bound) if clip_smooth else u
    if mask is True:
        if rule == "stompp":
            # Every entry frozen and no STE: the value is a constant, so no graph is needed at all.
            return (binary_sign(u) * scale).detach()
        mask = torch.ones((), dtype=torch.bool, device=u.device)
    return _MaskedBinarize.apply(u, mask, scale, bound, clip_smooth, rule != "stompp")
