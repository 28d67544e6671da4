"""Training modules: `StoMPPLinear` and `StoMPPConv2d`, built on one shared `Binarizer`.

A swap reuses the wrapped layer's Parameters (no copy, safe on the meta device): the new module *is* an
`nn.Linear` / `nn.Conv2d` whose forward binarizes its weight and input through `masked_binarize`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .functional import masked_binarize
from .masks import MaskState

#: Momentum of the running mean of |x| that sets the activation scale beta.
ACTIVATION_SCALE_MOMENTUM = 0.1


class Binarizer(nn.Module):
    """Binarizes one tensor (a weight, or a layer's input) under its `MaskState`.

    Args:
        rule: 'stompp', 'stompp_ste' or 'ste'.
        kind: 'weight' (smooth = identity, optional per-output-channel scale) or 'input' (smooth = clip, optional
            per-tensor scale beta kept as the buffer `scale`).
        scale_mode: 'channel' / 'none' for weights, 'tensor' / 'none' for inputs.
        shape: the mask shape: the weight's shape, or the per-sample input shape (None: set on first forward).
    """

    def __init__(self, rule: str, kind: str, scale_mode: str, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.rule = rule
        self.kind = kind
        self.scale_mode = scale_mode
        self.mask = self._new_mask(shape) if shape is not None else None
        # Set by `binarized(model)`: evaluate as if every entry were frozen, without touching any state.
        self.force_frozen = False
        # Set by `ProgressionController`; a progressive tensor trained without one never advances its mask.
        self.controlled = False
        if kind == "input" and scale_mode == "tensor":
            self.register_buffer("scale", torch.zeros((), dtype=torch.float32))
        else:
            self.scale = None

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, kind={self.kind!r}, scale={self.scale_mode!r}"

    @property
    def progressive(self) -> bool:
        return self.rule in ("stompp", "stompp_ste")

    def _new_mask(self, shape: tuple[int, ...]) -> MaskState:
        mask = MaskState(shape)
        mask.fill(self.rule == "ste")  # plain STE is hard sign from step 0; progressive rules start continuous
        return mask

    def weight_scale(self, w: torch.Tensor) -> torch.Tensor | float:
        """alpha: the per-output-channel mean |W| (`'channel'`), or 1."""
        if self.scale_mode == "channel":
            return w.detach().abs().mean(dim=tuple(range(1, w.ndim)), keepdim=True)
        return 1.0

    def ensure_mask(self, feature_shape: tuple[int, ...]) -> MaskState:
        if self.mask is None:
            self.mask = self._new_mask(feature_shape)
        elif self.mask.shape != tuple(feature_shape):
            raise ValueError(
                f"Binarized input has per-sample shape {tuple(feature_shape)} but this layer's input mask was "
                f"sized {self.mask.shape}; StoMPP input masks need a fixed input size."
            )
        return self.mask

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        """beta: the running mean of |x|, updated in training (not under `binarized`), initialised on first use."""
        batch = x.detach().abs().mean().float()
        if self.training and not self.force_frozen:
            with torch.no_grad():
                ema = (1 - ACTIVATION_SCALE_MOMENTUM) * self.scale + ACTIVATION_SCALE_MOMENTUM * batch
                self.scale.copy_(torch.where(self.scale > 0, ema, batch))
            return self.scale.to(x.dtype)
        return torch.where(self.scale > 0, self.scale, batch).to(x.dtype)

    def forward(self, u: torch.Tensor, feature_ndim: int | None = None) -> torch.Tensor:
        if self.training and self.progressive and not self.controlled:
            warnings.warn(
                "A StoMPP model is being trained without a StoMPPCallback (or ProgressionController): its masks "
                "never advance, so it trains fully continuous and never becomes binary. Pass "
                "`callbacks=[StoMPPCallback()]` to `Trainer`.",
                UserWarning,
                stacklevel=2,
            )
        if self.kind == "input":
            mask_state = self.ensure_mask(tuple(u.shape[-feature_ndim:]))
            scale = self._input_scale(u) if self.scale is not None else 1.0
            bound = scale
        else:
            mask_state = self.mask
            scale = self.weight_scale(u)
            bound = 1.0
        mask = True if self.force_frozen else mask_state.as_mask()
        return masked_binarize(u, mask, rule=self.rule, scale=scale, bound=bound, clip_smooth=self.kind == "input")


class StoMPPMixin:
    """Shared state and inspection API of the StoMPP training modules (DESIGN.md §3.3)."""

    #: Number of trailing input dimensions that make up one sample's features (1 for linear, 3 for conv2d).
    feature_ndim: int = 1
    weight_binarizer: Binarizer | None
    input_binarizer: Binarizer | None
    stompp_stage: int

    def _init_stompp(
        self,
        weights: str | None,
        activations: str | None,
        weight_scale: str,
        activation_scale: str,
        input_shape: tuple[int, ...] | None,
    ) -> None:
        self.stompp_stage = 0
        w = Binarizer(weights, "weight", weight_scale, tuple(self.weight.shape)) if weights is not None else None
        a = Binarizer(activations, "input", activation_scale, input_shape) if activations is not None else None
        self.weight_binarizer = w
        self.input_binarizer = a

    @classmethod
    def from_module(cls, module: nn.Module, config, stage: int = 0):
        """Swap `module` for a StoMPP module of the same class family, reusing its Parameters (no copy)."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = dict(module._modules)
        new._init_stompp(
            config.weights, config.activations, config.weight_scale, config.activation_scale, cls._input_shape(module)
        )
        new.stompp_stage = stage
        return new

    @staticmethod
    def _input_shape(module: nn.Module) -> tuple[int, ...] | None:
        return None

    def binarized_weight(self) -> torch.Tensor:
        return self.weight_binarizer(self.weight) if self.weight_binarizer is not None else self.weight

    def binarized_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_binarizer(x, self.feature_ndim) if self.input_binarizer is not None else x

    def binarizers(self) -> list[Binarizer]:
        return [b for b in (self.weight_binarizer, self.input_binarizer) if b is not None]

    def _mask_of(self, binarizer: Binarizer | None) -> torch.Tensor | None:
        if binarizer is None or binarizer.mask is None:
            return None
        return binarizer.mask.tensor(self.weight.device)

    @property
    def weight_mask(self) -> torch.Tensor | None:
        """Bool tensor of the weight's shape (True = frozen to sign), or None where weights stay full precision."""
        return self._mask_of(self.weight_binarizer)

    @property
    def input_mask(self) -> torch.Tensor | None:
        """Bool tensor of the per-sample input shape, or None where inputs are not binarized (or not yet seen)."""
        return self._mask_of(self.input_binarizer)

    @property
    def weight_frozen_fraction(self) -> float | None:
        b = self.weight_binarizer
        return None if b is None else b.mask.frozen_fraction

    @property
    def input_frozen_fraction(self) -> float | None:
        b = self.input_binarizer
        if b is None:
            return None
        if b.mask is None:  # shape not seen yet
            return 1.0 if b.rule == "ste" else 0.0
        return b.mask.frozen_fraction


class StoMPPLinear(StoMPPMixin, nn.Linear):
    """`nn.Linear` with StoMPP-binarized weight and input; the input mask has shape `[in_features]`."""

    feature_ndim = 1

    @staticmethod
    def _input_shape(module: nn.Module) -> tuple[int, ...]:
        return (module.in_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.binarized_input(x), self.binarized_weight(), self.bias)


class StoMPPConv2d(StoMPPMixin, nn.Conv2d):
    """`nn.Conv2d` with StoMPP-binarized weight and input; the input mask has the per-sample shape `[C, H, W]`.

    Padding is applied to the binarized input, so zero padding stays zero (as in binary CNN practice, the
    padded border is not part of the mask).
    """

    feature_ndim = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.binarized_input(x), self.binarized_weight(), self.bias)


#: Training module for each convertible layer type, most specific first.
STOMPP_MODULES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: StoMPPLinear, nn.Conv2d: StoMPPConv2d}
