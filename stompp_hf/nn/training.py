"""Training modules `StoMPPLinear` / `StoMPPConv2d`: an `nn.Linear` / `nn.Conv2d` whose forward binarizes its weight
and input through one shared `Binarizer` each.

A swap reuses the wrapped layer's Parameters (no copy, safe on the meta device): the new module *is* an
`nn.Linear` / `nn.Conv2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.factored import factored_linear
from ..core.functional import binary_linear_applies, binary_sign, layer_frozen, output_scale, scale_output
from ..core.surge import surge
from .base import StoMPPModule
from .binarizer import Binarizer, compiles_by_state
from .recompute import _RecomputeSaved


class StoMPPMixin(StoMPPModule):
    """What `StoMPPLinear` and `StoMPPConv2d` share: a weight and an input binarizer around one op, SURGE, and the
    swap that reuses the wrapped layer's Parameters."""

    #: Number of trailing input dimensions that make up one sample's features (1 for linear, 3 for conv2d).
    feature_ndim: int = 1

    def _init_stompp(
        self,
        weights: str | None,
        activations: str | None,
        weight_scale: str,
        activation_scale: str,
        input_shape: tuple[int, ...] | None,
        activation_clip: float = 1.0,
        compensation: str | None = None,
        surge_eta: float = 0.5,
    ) -> None:
        w = Binarizer(weights, "weight", weight_scale, tuple(self.weight.shape)) if weights is not None else None
        a = (
            Binarizer(activations, "input", activation_scale, input_shape, clip=activation_clip)
            if activations is not None
            else None
        )
        self.weight_binarizer = w
        self.input_binarizer = a
        self.surge_eta = surge_eta
        #: lambda of the last SURGE backward (a 0-dim tensor), None before the first one or without SURGE.
        self.surge_lambda: torch.Tensor | None = None
        if compensation == "surge":
            # SURGE's auxiliary full-precision weight, initialised from the latent weight. On the meta device (inside
            # `from_pretrained`) this is a meta tensor; the quantizer copies the loaded latent weight into it.
            self.surge_weight = nn.Parameter(self.weight.detach().clone(), requires_grad=self.weight.requires_grad)
        else:
            self.surge_weight = None

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        config,
        stage: int = 0,
        input_shape: tuple[int, ...] | None = None,
        binarize_input: bool = True,
    ) -> StoMPPMixin:
        """Swap `module` for a StoMPP module of the same class family, reusing its Parameters (no copy).

        `input_shape`: the per-sample input shape (for the input mask) when the layer type does not fix it (a
        convolution's `[C, H, W]`, traced at conversion); without it the mask is sized at the first forward.
        `binarize_input=False`: binarize the weight only (at activation sites the preceding `StoMPPActivation`
        binarizes the input).
        """
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = dict(module._modules)
        new._init_stompp(
            config.weights,
            config.activations if binarize_input else None,
            config.weight_scale,
            config.activation_scale,
            cls._input_shape(module) or (tuple(input_shape) if input_shape is not None else None),
            config.activation_clip,
            config.compensation,
            config.surge_eta,
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

    def _record_surge_lambda(self, lam: torch.Tensor) -> None:
        self.surge_lambda = lam

    def _stompp_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        """The layer's output, through SURGE's compensator when it is on and training."""
        if self.surge_weight is None or not (self.training and torch.is_grad_enabled()):
            return self._binary_op(x, op)
        return surge(
            x,
            self.surge_weight,
            lambda xb: self._binary_op(xb, op),
            lambda xa, wa: op(xa, wa, None),
            self.surge_eta,
            self._record_surge_lambda,
        )

    def _binary_op(self, x: torch.Tensor, op) -> torch.Tensor:
        """`op(binarized input, binarized weight, bias)`.

        When every binarized tensor of the layer is frozen, the scales move to the output:
        `op(sign(x), sign(W)) * (beta * alpha) + bias`, the form of the packed modules and the XNOR kernel (binary
        x binary products are exact integers there). Binarized operands that the op saves for its backward are
        recomputed there from `x` and `W` rather than kept (`_RecomputeSaved`). No recipe is built where the op
        can have no backward (grad disabled, `inference_mode`, nothing requiring a gradient) or under
        `torch.compile`, which chooses what to save itself.
        """
        compiling = torch.compiler.is_compiling()
        factored = all(b.is_frozen(compiling) for b in self.binarizers())
        if not factored and compiling and compiles_by_state(x) and compiles_by_state(self.weight):
            return self._binary_op_by_state(x, op)
        weight, x_scale, w_scale, recompute = self.weight, None, None, []
        recipes = (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad)
            and not compiling  # the compiler chooses what to save for the backward itself
        )
        if factored and recipes and self.factored_op is not None and type(x) is torch.Tensor:
            return self._factored_op(x)
        if self.input_binarizer is not None:
            # the binarized input feeds `op` alone, whose backward returns a fresh input gradient
            x, x_scale, fn = self.input_binarizer.binarize(
                x, self.feature_ndim, factored, recompute=recipes, owned_grad=True, operand_dtype=_operand_dtype(x)
            )
            if fn is not None:
                recompute.append((x, fn))
        if self.weight_binarizer is not None:
            weight, w_scale, fn = self.weight_binarizer.binarize(weight, factored=factored, recompute=recipes)
            if fn is not None:
                recompute.append((weight, fn))
        bias = None if factored else self.bias
        if recompute and (x.requires_grad or weight.requires_grad):  # binarized: a 'stompp' frozen one is a constant
            with _RecomputeSaved(recompute):
                y = op(x, weight, bias)
        else:
            y = op(x, weight, bias)
        if not factored:
            return y
        return scale_output(y, output_scale(x_scale, w_scale, self.feature_ndim), self.bias, self.feature_ndim)

    #: The layer's factored form as one autograd node with its backward written out (`core.factored`), or None
    #: (the ops one by one).
    factored_op = None

    def _factored_op(self, x: torch.Tensor) -> torch.Tensor:
        """`_binary_op` of a frozen layer in training, through `factored_op`: the same forward values, and the
        gradients without an output-sized `g * scale` (docs/design.md, "Frozen layers: the factored form")."""
        a, w = self.input_binarizer, self.weight_binarizer
        operand = _operand_dtype(x)
        # both binarized and a kernel for the binary product (the XNOR kernel, linear layers): it reads the signs
        # of the latent weight and input itself, so neither is written here, except an autocast operand, which
        # the weight gradient reads (docs/design.md, "Frozen layers: the factored form")
        dtype = _product_dtype(x, self.weight, operand) if a is not None and w is not None else None
        kernel = (
            dtype is not None and self.factored_op is factored_linear and binary_linear_applies(x, self.weight, dtype)
        )
        x_sign, beta, bound = x, None, None
        if a is not None:
            written = not kernel or operand is not None  # whether the input's sign is needed as a tensor
            # under autocast, straight into the dtype `F.linear` would cast it to
            sign, scale, bound = a.frozen_sign(x, self.feature_ndim, operand, sign=written, shared=True)
            x_sign = None if not written else binary_sign(x) if sign is None else sign
            beta = scale if isinstance(scale, torch.Tensor) else None
            bound = torch.as_tensor(bound, dtype=x.dtype, device=x.device).detach()
        w_sign, alpha = self.weight, None
        if w is not None:
            _, scale, _ = w.frozen_sign(self.weight)
            w_sign = None if kernel else binary_sign(self.weight)
            alpha = scale if isinstance(scale, torch.Tensor) else None
        x_ste = a is None or a.rule != "stompp"
        w_ste = w is None or w.rule != "stompp"
        return self.factored_op(x, self.weight, self.bias, x_sign, w_sign, beta, alpha, bound, x_ste, w_ste)

    def _binary_op_by_state(self, x: torch.Tensor, op) -> torch.Tensor:
        """`_binary_op` under `torch.compile`, for a layer with a progressive tensor: the same values, entry for entry,
        from a graph that does not depend on the mask states (docs/design.md, "torch.compile").

        Whether the layer takes the factored form is read when the graph runs (`layer_frozen`), and the graph
        computes `op(x', W', bias') * scale' + bias''` with `(bias', scale', bias'') = (0, beta * alpha, bias)` in the
        factored form and `(bias, 1, 0)` otherwise: both are exactly what eager mode computes (a product with 1 and a
        sum with 0 are exact, and a product of +-1 operands is an exact integer with or without a zero bias).
        """
        if self.input_binarizer is not None:  # sized first: the mask's handle joins the layer's group
            self.input_binarizer.ensure_mask(tuple(x.shape[-self.feature_ndim :]))
        group = [b.mask.handle for b in self.binarizers() if not b.force_frozen]
        frozen = layer_frozen(x, group)
        weight, x_scale, w_scale = self.weight, None, None
        if self.input_binarizer is not None:
            x, x_scale = self.input_binarizer.binarize_by_state(x, self.feature_ndim, group)
        if self.weight_binarizer is not None:
            weight, w_scale = self.weight_binarizer.binarize_by_state(weight, None, group)
        bias = self.bias
        y = op(x, weight, None if bias is None else torch.where(frozen, 0.0, bias))
        scale = output_scale(x_scale, w_scale, self.feature_ndim)
        if scale is not None:
            y = y * torch.where(frozen, scale, 1.0).to(y.dtype)
        if bias is not None:
            y = y + torch.where(frozen, bias, 0.0).to(y.dtype).view(-1, *([1] * (self.feature_ndim - 1)))
        return y

    def binary_flags(self) -> dict[str, bool]:
        """The `BinaryMixin` flags describing this module once packed."""
        w, a = self.weight_binarizer, self.input_binarizer
        return {
            "binary_weights": w is not None,
            "weight_scale": w is not None and w.scale_mode == "channel",
            "binary_inputs": a is not None,
            "input_scale": a is not None and a.scale is not None,
        }


def _operand_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a layer's `F.linear` / convolution casts a float32 `x` to under autocast (their autocast policy
    is the lower precision), or None (no autocast there, or another dtype, which autocast leaves alone)."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _product_dtype(x: torch.Tensor, weight: torch.Tensor, operand: torch.dtype | None) -> torch.dtype | None:
    """The dtype of a frozen linear layer's `F.linear(sign(x), sign(W))` where a kernel can read it from the signs
    of `x` as given, or of its autocast operand (`operand`, `_operand_dtype(x)`) as the layer writes it: the
    autocast dtype, or `x`'s where there is no autocast; None where `F.linear` would cast `x` differently or
    refuse the pair."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype if operand == dtype or x.dtype == dtype else None
    return x.dtype if x.dtype == weight.dtype else None


class StoMPPLinear(StoMPPMixin, nn.Linear):
    """`nn.Linear` with StoMPP-binarized weight and input; the input mask has shape `[in_features]`."""

    feature_ndim = 1
    factored_op = staticmethod(factored_linear)

    @staticmethod
    def _input_shape(module: nn.Module) -> tuple[int, ...]:
        return (module.in_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._stompp_forward(x, F.linear)


class StoMPPConv2d(StoMPPMixin, nn.Conv2d):
    """`nn.Conv2d` with StoMPP-binarized weight and input; the input mask has the per-sample shape `[C, H, W]`.

    Padding is applied to the binarized input, so zero padding stays zero (as in binary CNN practice, the
    padded border is not part of the mask).
    """

    feature_ndim = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._stompp_forward(x, self._conv_forward)
