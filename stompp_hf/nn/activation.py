"""`StoMPPActivation`: an activation function made a StoMPP tensor, and `BinaryActivation`, its packed twin.

The paper's BNN (StoMPP Table 6: "Activation function (unfrozen): Clip; Frozen activation: Sign") replaces the
activation functions of a network, the one after each residual addition included, by

    forward    y = M * a * sign(x) + (1 - M) * clip(x, -c, c)           (docs/design.md, Eq. 1)
    "stompp"   dx = (1 - M) * g * 1{|x| <= c}                          (Eq. 2: a frozen entry passes no gradient)

with `a` the activation scale (beta, or 1 with `activation_scale="none"`) and `c = activation_clip * a`. Once every
entry is frozen the output is a constant of the input's sign, so nothing upstream receives a gradient through it:
the "gradient blockade" that makes the stage order matter. "stompp_ste" and "ste" give frozen entries the clipped
straight-through gradient `1{|x| <= c} * g` instead (Eq. 3). The mask has the per-sample shape of the activation
(`[C, H, W]` after a convolution), set at conversion from a traced forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.functional import binary_sign, hard_sign
from .base import StoMPPModule
from .binarizer import Binarizer


class StoMPPActivation(StoMPPModule, nn.Module):
    """A StoMPP activation (see the module docstring) of per-sample shape `shape`.

    Args:
        rule: 'stompp', 'stompp_ste' or 'ste'.
        shape: the per-sample shape of the activation (its mask's shape).
        scale_mode: 'tensor' (beta, a running mean of |x|) or 'none'.
        clip: the clip bound in units of the scale (`StoMPPConfig.activation_clip`).
        replaces: the class name of the activation function this module replaced (kept for the record and reload).
    """

    def __init__(
        self, rule: str, shape: tuple[int, ...], scale_mode: str = "none", clip: float = 1.0, replaces: str = ""
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.replaces = replaces
        self.weight_binarizer = None
        self.input_binarizer = Binarizer(rule, "input", scale_mode, self.shape, clip=clip)
        # where masks go when there is no scale buffer to tell the device (moves with `.to()`, never saved)
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        #: lambda of SURGE (never used by an activation; kept so every StoMPP module can be inspected alike).
        self.surge_lambda = None

    @classmethod
    def from_config(cls, config, shape: tuple[int, ...], replaces: str = "") -> StoMPPActivation:
        return cls(config.activations, shape, config.activation_scale, config.activation_clip, replaces)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, replaces={self.replaces!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no op of this module saves the result, so no recompute recipe is needed
        return self.input_binarizer.binarize(x, len(self.shape), recompute=False)[0]


class BinaryActivation(nn.Module):
    """Packed twin of a fully frozen `StoMPPActivation`: `a * sign(x)` (or `sign(x)`), bit-identical to it.

    Buffer `input_scale` (a scalar float32 beta) only with `activation_scale="tensor"`. When autograd tracks `x`
    (LoRA adapters before it training on a packed base), the same values come with the clipped straight-through
    gradient `1{|x| <= input_clip * a}`, as the packed layers give their inputs, so gradients reach earlier layers.
    """

    #: What it binarizes, in the terms of `BinaryMixin` (an activation is one binarized tensor, the "input").
    binary_weights = False
    binary_inputs = True

    def __init__(
        self,
        input_scale: bool = False,
        replaces: str = "",
        device: torch.device | str | None = None,
        input_clip: float = 1.0,
    ):
        super().__init__()
        self.replaces = replaces
        #: The STE window in units of the scale (`StoMPPConfig.activation_clip`); only gradients use it.
        self.input_clip = float(input_clip)
        scale = torch.ones((), dtype=torch.float32, device=device) if input_scale else None
        self.register_buffer("input_scale", scale)

    def extra_repr(self) -> str:
        return f"input_scale={self.input_scale is not None}, replaces={self.replaces!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.input_scale.to(x.dtype) if self.input_scale is not None else 1.0
        if x.requires_grad and torch.is_grad_enabled():
            return hard_sign(x, ste=True, scale=scale, bound=scale * self.input_clip)
        sign = binary_sign(x)
        return sign if self.input_scale is None else sign * scale

    @classmethod
    def from_module(cls, module: nn.Module, config, unpack_cache: bool = False) -> BinaryActivation:
        """An empty packed activation for a checkpoint of `config` (the scale loads with the state dict)."""
        return cls(
            config.activation_scale == "tensor", getattr(module, "replaces", ""), input_clip=config.activation_clip
        )

    @classmethod
    def from_stompp(cls, module: StoMPPActivation, unpack_cache: bool = False) -> BinaryActivation:
        """Pack a fully frozen `StoMPPActivation`: the result computes its outputs bit for bit."""
        binarizer = module.input_binarizer
        new = cls(
            binarizer.scale is not None, module.replaces, device=module.stompp_device(), input_clip=binarizer.clip
        )
        if new.input_scale is not None:
            with torch.no_grad():
                new.input_scale.copy_(binarizer.scale)
        return new
