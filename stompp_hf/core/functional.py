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

import torch

#: The training rules of a binarized tensor (`StoMPPConfig.weights` / `activations`; None keeps it full precision).
RULES: tuple[str, ...] = ("stompp", "stompp_ste", "ste")


def binary_sign(u: torch.Tensor) -> torch.Tensor:
    """`sign` with `sign(0) = sign(-0.0) = +1` and `sign(NaN) = -1`: values in {-1, +1} with the dtype of `u`.

    Computed as `2 * (u >= 0) - 1` with the comparison written straight into a float tensor: three vectorized
    passes, several times faster on CPU than `torch.where` or a bool intermediate.
    """
    u = u.detach()
    return torch.ge(u, 0, out=torch.empty_like(u)).mul_(2).sub_(1)


def _window(u: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`1{|u| <= bound}` as 0/1 floats of `dtype` (default `u`'s), the comparison written straight into them (a
    bool intermediate is much slower on CPU)."""
    u = u.detach()
    return torch.le(u.abs(), bound, out=torch.empty_like(u, dtype=dtype))


def _masked_values(u, mask, scale, bound, clip_smooth: bool) -> torch.Tensor:
    """`where(M, a * sign(u), smooth(u))`: the forward of `_MaskedBinarize`, and all of it where no gradient is
    taken (`no_grad`, `inference_mode`, a `u` that needs none), which then keeps no window."""
    hard = binary_sign(u) * scale
    soft = torch.clamp(u, -bound, bound) if clip_smooth else u
    return torch.where(mask, hard, soft)


class _MaskedBinarize(torch.autograd.Function):
    """Forward `where(M, a * sign(u), smooth(u))`; backward as in the module docstring.

    Inputs (`clip_smooth`) keep only the int8 window `1{|u| <= c}` for the backward pass (one byte per entry instead
    of `u`'s four), plus the mask under "stompp". Weights keep the mask under "stompp" and nothing under
    "stompp_ste", whose weight gradient is the identity everywhere (BinaryConnect's STE on frozen entries).
    """

    @staticmethod
    def forward(ctx, u, mask, scale, bound, clip_smooth: bool, ste_on_frozen: bool):  # type: ignore[override]
        # the window as int8: one byte per entry, and casts to and from int8 are cheap (bool ones are not)
        window = _window(u, bound).to(torch.int8) if clip_smooth else None
        ctx.save_for_backward(None if ste_on_frozen else mask, window)
        ctx.clip_smooth = clip_smooth
        ctx.ste_on_frozen = ste_on_frozen
        return _masked_values(u, mask, scale, bound, clip_smooth)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # grad times a 0/1 factor built with float arithmetic (no `where`, no bool tensors: both are slow on CPU)
        mask, window = ctx.saved_tensors
        if ctx.clip_smooth and ctx.ste_on_frozen:  # inputs: 1{|u| <= c} everywhere
            return grad * window.to(grad.dtype), None, None, None, None, None
        if ctx.ste_on_frozen:  # weights: the identity everywhere (BinaryConnect's STE on frozen entries)
            return grad, None, None, None, None, None
        frozen = mask.to(grad.dtype)
        if ctx.clip_smooth:  # inputs: 1{|u| <= c} on continuous entries, 0 on frozen ones
            factor = window.to(grad.dtype) * (1 - frozen)
        else:  # weights: 1 on continuous entries, 0 on frozen ones
            factor = 1 - frozen
        return grad * factor, None, None, None, None, None


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
    def forward(ctx, u, value, bound, grad_divisor):  # type: ignore[override]
        ctx.save_for_backward(u if bound is not None else None, bound, grad_divisor)
        sign = binary_sign(u)
        return sign if value is None else sign * value

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        u, bound, divisor = ctx.saved_tensors
        if bound is None:  # a weight: the identity (divided by the scale in the factored form)
            return (grad if divisor is None else grad / divisor.to(grad.dtype)), None, None, None
        window = _window(u, bound, grad.dtype)
        if divisor is not None:
            window.div_(divisor)
        return window.mul_(grad), None, None, None


class _Clip(torch.autograd.Function):
    """`clamp(u, -c, c)` with gradient `1{|u| <= c} * g`, computed with float comparisons (torch's own clamp
    backward goes through bool masks, `where` and `masked_fill`, several times slower on CPU). Saves `u` itself."""

    @staticmethod
    def forward(ctx, u, bound):  # type: ignore[override]
        ctx.save_for_backward(u, bound)
        return torch.clamp(u, -bound, bound)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        u, bound = ctx.saved_tensors
        window = _window(u, bound, grad.dtype)
        return window.mul_(grad), None


def clip(u: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """`clamp(u, -bound, bound)` (a 0-d `bound`), with the fast backward of `_Clip` when autograd tracks `u`."""
    if u.requires_grad and torch.is_grad_enabled():
        return _Clip.apply(u, bound)
    return torch.clamp(u, -bound, bound)


def hard_sign(
    u: torch.Tensor,
    *,
    ste: bool,
    scale: torch.Tensor | float = 1.0,
    bound: torch.Tensor | float | None = None,
    factored: bool = False,
) -> torch.Tensor:
    """A fully frozen tensor: `scale * sign(u)`, or `sign(u)` alone when `factored` (the caller multiplies the
    layer output by `scale`, which keeps binary x binary products exact integers, docs/design.md "Core").

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
        sign = binary_sign(u)
        return sign if value is None else sign * value
    divisor = None
    if factored and not unit:
        divisor = torch.as_tensor(scale, dtype=u.dtype, device=u.device)
        divisor = torch.where(divisor > 0, divisor, torch.inf)
    if bound is not None:
        bound = torch.as_tensor(bound, dtype=u.dtype, device=u.device).detach()
    return _HardSign.apply(u, value, bound, divisor)


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
        bound: inputs only: the clip bound `c` (see the module docstring); detached. Ignored for weights.
        clip_smooth: True for inputs (smooth = clamp to [-c, c], STE `1{|u| <= c} * g`), False for weights (smooth
            = identity, STE the identity `g`: BinaryConnect).
    """
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {', '.join(map(repr, RULES))}, but got {rule!r}.")
    if isinstance(scale, torch.Tensor):
        scale = scale.detach()
    if rule == "ste":
        mask = True
    if not clip_smooth:
        bound = None  # weights: no clip window (BinaryConnect's identity STE)
    if mask is True:
        return hard_sign(u, ste=rule != "stompp", scale=scale, bound=bound)
    if mask is False:
        return clip(u, torch.as_tensor(bound, dtype=u.dtype, device=u.device).detach()) if clip_smooth else u
    if bound is not None:
        bound = torch.as_tensor(bound, dtype=u.dtype, device=u.device).detach()
    if not (u.requires_grad and torch.is_grad_enabled()):  # no backward: the same values, no window
        return _masked_values(u, mask, scale, bound, clip_smooth)
    return _MaskedBinarize.apply(u, mask, scale, bound, clip_smooth, rule != "stompp")


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
    """`y * scale + bias` as two separately rounded operations (the XNOR kernel computes the same)."""
    if scale is not None:
        y = y * scale.to(y.dtype)
    if bias is not None:
        y = y + bias.view(-1, *([1] * (feature_ndim - 1)))
    return y
