"""Training modules `StoMPPLinear` / `StoMPPConv2d` (one shared `Binarizer`) and their packed inference twins.

A swap reuses the wrapped layer's Parameters (no copy, safe on the meta device): the new module *is* an
`nn.Linear` / `nn.Conv2d` whose forward binarizes its weight and input through `masked_binarize`.

`BinaryLinear` / `BinaryConv2d` hold a fully binarized layer as 1-bit packed weights (`weight_packed`, uint8, 8
signs per byte) plus the per-output-channel scale (`weight_scale`) and the activation scale (`input_scale`). They
compute exactly what the frozen training module computes (same sign convention, same operations in the same
order), so logits match the trained model bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import xnor
from .functional import binary_sign, hard_sign, masked_binarize, surge
from .masks import MaskState, pack_signs, unpack_signs

#: Momentum of the running mean of |x| that sets the activation scale beta.
ACTIVATION_SCALE_MOMENTUM = 0.1


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a `DTensor` (FSDP2, tensor parallel), which holds only this rank's shard."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "full_tensor")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded `DTensor` (a collective: every rank must call it), or `tensor` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def _in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (where checkpointed forwards are recomputed)."""
    if torch.compiler.is_compiling():  # a compiled graph never re-runs the forward inside the backward
        return False
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class Binarizer(nn.Module):
    """Binarizes one tensor (a weight, or a layer's input) under its `MaskState`.

    Args:
        rule: 'stompp', 'stompp_ste' or 'ste'.
        kind: 'weight' (smooth = identity, optional per-output-channel scale) or 'input' (smooth = clip, optional
            per-tensor scale beta kept as the buffer `scale`).
        scale_mode: 'channel' / 'none' for weights, 'tensor' / 'none' for inputs.
        shape: the mask shape: the weight's shape, or the per-sample input shape (None: set on first forward).
        clip: inputs only: the clip bound in units of the scale (`StoMPPConfig.activation_clip`).
    """

    def __init__(
        self, rule: str, kind: str, scale_mode: str, shape: tuple[int, ...] | None = None, clip: float = 1.0
    ) -> None:
        super().__init__()
        self.rule = rule
        self.clip = clip
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
        clip = f", clip={self.clip}" if self.kind == "input" and self.clip != 1.0 else ""
        return f"rule={self.rule!r}, kind={self.kind!r}, scale={self.scale_mode!r}{clip}"

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
        """beta: the running mean of |x|, updated in training (not under `binarized`), initialised on first use.

        A forward run inside a backward pass is a gradient-checkpointing recomputation: it reuses the beta of the
        original forward instead of updating it a second time (which would also make the recomputed forward
        differ from the original one).
        """
        batch = x.detach().abs().mean().float()
        if self.training and not self.force_frozen and not _in_backward():
            with torch.no_grad():
                ema = (1 - ACTIVATION_SCALE_MOMENTUM) * self.scale + ACTIVATION_SCALE_MOMENTUM * batch
                self.scale.copy_(torch.where(self.scale > 0, ema, batch))
            return self.scale.to(x.dtype)
        return torch.where(self.scale > 0, self.scale, batch).to(x.dtype)

    @property
    def frozen(self) -> bool:
        """Every entry is frozen to sign in this forward: plain STE, `binarized(model)`, or a finished stage."""
        return self.force_frozen or self.rule == "ste" or (self.mask is not None and self.mask.value is True)

    def _scale_and_bound(
        self, u: torch.Tensor, feature_ndim: int | None
    ) -> tuple[MaskState, torch.Tensor | float, torch.Tensor | float]:
        if self.training and self.progressive and not self.controlled:
            warnings.warn(
                "A StoMPP model is being trained without a StoMPPCallback (or ProgressionController): its masks "
                "never advance, so it trains fully continuous and never becomes binary. Pass "
                "`callbacks=[StoMPPCallback()]` to `Trainer`.",
                UserWarning,
                stacklevel=3,
            )
        if self.kind == "input":
            mask_state = self.ensure_mask(tuple(u.shape[-feature_ndim:]))
            scale = self._input_scale(u) if self.scale is not None else 1.0
            return mask_state, scale, scale * self.clip if self.clip != 1.0 else scale
        return self.mask, self.weight_scale(u), 1.0

    def forward(self, u: torch.Tensor, feature_ndim: int | None = None) -> torch.Tensor:
        return self.binarize(u, feature_ndim)[0]

    def binarize(
        self, u: torch.Tensor, feature_ndim: int | None = None, factored: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | float | None, Callable[[], torch.Tensor] | None]:
        """`(binarized u, output scale, recompute)`: what a layer's forward needs from this binarizer.

        With `factored` (only for a `frozen` tensor) the result is `sign(u)` in {-1, +1} with this rule's gradient
        and the scale is returned for the caller to apply to the layer output (`forward(u) == scale * result`);
        otherwise the result is `forward(u)` and the scale None. `recompute()` rebuilds the result bit for bit from
        `u` (None where the result is `u` itself, or the tensor is mid-transition), so the layer can let its op
        save `u`, which it shares with other layers or keeps anyway, instead of a second activation-sized copy.
        """
        mask_state, scale, bound = self._scale_and_bound(u, feature_ndim)
        if self.frozen:
            out = hard_sign(u, ste=self.rule != "stompp", scale=scale, bound=bound, factored=factored)
            # the same values without the straight-through graph
            recipe = _recipe(u, lambda: hard_sign(u, ste=False, scale=scale, factored=factored))
            return out, scale if factored else None, recipe
        if factored:
            raise ValueError("`factored` binarization needs a frozen tensor.")
        mask = mask_state.as_mask()
        out = masked_binarize(u, mask, rule=self.rule, scale=scale, bound=bound, clip_smooth=self.kind == "input")
        if mask is False and self.kind == "input":
            b = torch.as_tensor(bound, dtype=u.dtype, device=u.device).detach()
            return out, None, _recipe(u, lambda: torch.clamp(u.detach(), -b, b))
        return out, None, None


def _recipe(u: torch.Tensor, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn`, guarded like a tensor autograd saved: it raises if `u` was modified in place before the backward."""
    version = u._version

    def recompute() -> torch.Tensor:
        if u._version != version:
            raise RuntimeError(
                "A binarized layer's input was modified by an inplace operation after the layer used it, so its "
                f"backward pass cannot recompute the binarized input (version {u._version}, expected {version}). "
                "Make the inplace operation out of place."
            )
        return fn()

    return recompute


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


class _Recompute:
    __slots__ = ("fn", "size", "stride", "offset")

    def __init__(self, fn: Callable[[], torch.Tensor], size, stride, offset: int) -> None:
        self.fn, self.size, self.stride, self.offset = fn, size, stride, offset


class _RecomputeSaved(torch.autograd.graph.saved_tensors_hooks):
    """Recomputes binarized operands in the backward pass instead of keeping them from the forward pass.

    The op (a matmul / convolution) saves its operands for its backward; a saved tensor that is one of the
    registered results (the tensor itself or a view of all of it: same data pointer, same size) is stored as its
    recipe, `recompute()` plus the view's geometry, and rebuilt bit for bit when the backward needs it. The recipe
    holds the latent tensor (the layer input, which the previous layer or the other projections of the same input
    keep anyway, or the weight Parameter): an elementwise pass in the backward instead of an activation-sized
    copy per layer.
    """

    def __init__(self, entries: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]]) -> None:
        table = {(t.data_ptr(), t.numel()): (t.storage_offset(), fn) for t, fn in entries}

        def pack(t: torch.Tensor):
            hit = table.get((t.data_ptr(), t.numel()))
            if hit is None:
                return t
            base_offset, fn = hit
            return _Recompute(fn, t.size(), t.stride(), t.storage_offset() - base_offset)

        def unpack(saved):
            if isinstance(saved, _Recompute):
                r = saved.fn()
                return r.as_strided(saved.size, saved.stride, r.storage_offset() + saved.offset)
            return saved

        super().__init__(pack, unpack)


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
        activation_clip: float = 1.0,
        compensation: str | None = None,
        surge_eta: float = 0.5,
    ) -> None:
        self.stompp_stage = 0
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
    def from_module(cls, module: nn.Module, config, stage: int = 0):
        """Swap `module` for a StoMPP module of the same class family, reusing its Parameters (no copy)."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = dict(module._modules)
        new._init_stompp(
            config.weights,
            config.activations,
            config.weight_scale,
            config.activation_scale,
            cls._input_shape(module),
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
        recomputed there from `x` and `W` rather than kept (`_RecomputeSaved`).
        """
        factored = all(b.frozen for b in self.binarizers())
        weight, x_scale, w_scale, recompute = self.weight, None, None, []
        if self.input_binarizer is not None:
            x, x_scale, fn = self.input_binarizer.binarize(x, self.feature_ndim, factored)
            if fn is not None:
                recompute.append((x, fn))
        if self.weight_binarizer is not None:
            weight, w_scale, fn = self.weight_binarizer.binarize(weight, factored=factored)
            if fn is not None:
                recompute.append((weight, fn))
        bias = None if factored else self.bias
        if (
            recompute
            and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad)
            and not torch.compiler.is_compiling()  # the compiler chooses what to save for the backward itself
        ):
            with _RecomputeSaved(recompute):
                y = op(x, weight, bias)
        else:
            y = op(x, weight, bias)
        if not factored:
            return y
        return scale_output(y, output_scale(x_scale, w_scale, self.feature_ndim), self.bias, self.feature_ndim)

    def binary_flags(self) -> dict[str, bool]:
        """The `BinaryMixin` flags describing this module once packed."""
        w, a = self.weight_binarizer, self.input_binarizer
        return {
            "binary_weights": w is not None,
            "weight_scale": w is not None and w.scale_mode == "channel",
            "binary_inputs": a is not None,
            "input_scale": a is not None and a.scale is not None,
        }

    @property
    def fully_frozen(self) -> bool:
        """True when every binarized tensor of this module is frozen to sign (the module can be packed)."""
        return all(
            b.rule == "ste" or (b.mask is not None and b.mask.frozen_fraction == 1.0) for b in self.binarizers()
        )

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
        return self._stompp_forward(x, F.linear)


class StoMPPConv2d(StoMPPMixin, nn.Conv2d):
    """`nn.Conv2d` with StoMPP-binarized weight and input; the input mask has the per-sample shape `[C, H, W]`.

    Padding is applied to the binarized input, so zero padding stays zero (as in binary CNN practice, the
    padded border is not part of the mask).
    """

    feature_ndim = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._stompp_forward(x, self._conv_forward)


#: Training module for each convertible layer type, most specific first.
STOMPP_MODULES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: StoMPPLinear, nn.Conv2d: StoMPPConv2d}


class BinaryMixin:
    """Packed inference state shared by `BinaryLinear` and `BinaryConv2d`.

    Buffers (the names a packed checkpoint stores under the module's prefix):
        weight_packed: uint8 `[out, ceil(K / 8)]`, K = prod(weight_shape[1:]); bit set = +1 (see `pack_signs`).
        weight_scale: `[out]`, the per-output-channel alpha (only with `weight_scale="channel"`).
        input_scale: scalar float32 beta (only with binarized inputs and `activation_scale="tensor"`).
    A layer whose weights stay full precision (`weights=None`, a binary-activation-only network) keeps `weight`.

    Args:
        unpack_cache: keep the unpacked float weight resident after the first forward (faster, but costs the
            memory of a float copy); by default every forward unpacks and the float copy is freed.
    """

    weight_shape: tuple[int, ...]
    binary_inputs: bool
    unpack_cache: bool
    feature_ndim: int
    kernel: str

    def _init_binary(
        self,
        weight_shape: tuple[int, ...],
        *,
        bias: bool,
        binary_weights: bool,
        weight_scale: bool,
        binary_inputs: bool,
        input_scale: bool,
        unpack_cache: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        out = weight_shape[0]
        self.weight_shape = tuple(weight_shape)
        self.binary_inputs = binary_inputs
        self.unpack_cache = unpack_cache
        #: How binary-input x binary-weight layers compute (`set_kernel`): "auto", "xnor" or "reference".
        self.kernel = "auto"
        #: STE window of the input binarization, in units of beta (`StoMPPConfig.activation_clip`); only used when
        #: gradients flow through the layer.
        self.input_clip = 1.0
        self._unpacked: tuple[int, torch.Tensor] | None = None
        factory = {"dtype": dtype, "device": device}
        if binary_weights:
            nbytes = (math.prod(weight_shape[1:]) + 7) // 8
            self.register_buffer("weight_packed", torch.zeros(out, nbytes, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.ones(out, **factory) if weight_scale else None)
            self.weight = None
        else:
            self.register_buffer("weight_packed", None)
            self.register_buffer("weight_scale", None)
            self.weight = nn.Parameter(torch.empty(weight_shape, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out, **factory), requires_grad=False) if bias else None
        scale = torch.ones((), dtype=torch.float32, device=device) if binary_inputs and input_scale else None
        self.register_buffer("input_scale", scale)

    @classmethod
    def flags_from_config(cls, config) -> dict[str, bool]:
        return {
            "binary_weights": config.weights is not None,
            "weight_scale": config.weight_scale == "channel",
            "binary_inputs": config.activations is not None,
            "input_scale": config.activation_scale == "tensor",
        }

    @property
    def binary_weights(self) -> bool:
        return self.weight_packed is not None

    @property
    def qweight(self) -> torch.Tensor | None:
        """The packed weight under the name quantization tooling (peft, GPTQ conventions) looks for to find the
        device of a quantized layer without a float `weight`; None where weights stay full precision."""
        return self.weight_packed if self.weight_packed is not None else self.weight

    def extra_repr(self) -> str:
        return (
            f"weight_shape={self.weight_shape}, bias={self.bias is not None}, binary_weights={self.binary_weights}, "
            f"binary_inputs={self.binary_inputs}, unpack_cache={self.unpack_cache}"
        )

    def sign_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The +-1 float weight `sign(W)` (kept resident with `unpack_cache`), or the full-precision `weight`."""
        if self.weight_packed is None:
            return self.weight
        dtype = dtype or torch.get_default_dtype()
        version = self.weight_packed._version
        cached = self._unpacked
        if cached is not None and cached[0] == version and cached[1].dtype == dtype:
            return cached[1]
        weight = unpack_signs(self.weight_packed, math.prod(self.weight_shape[1:]), dtype).reshape(self.weight_shape)
        if self.unpack_cache:
            self._unpacked = (version, weight)
        return weight

    def unpacked_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight the layer computes with: alpha * sign(W) (or +-1), or the full-precision `weight`."""
        weight = self.sign_weight(dtype)
        if self.weight_packed is None or self.weight_scale is None:
            return weight
        return weight * self.weight_scale.view(-1, *([1] * (len(self.weight_shape) - 1))).to(weight.dtype)

    def binarize_input(self, x: torch.Tensor) -> torch.Tensor:
        """`sign(x)` in {-1, +1}, sign(0) = +1 exactly as in training (beta multiplies the layer output instead).

        When autograd tracks `x` (e.g. LoRA adapters before this layer are training on a packed base), the same
        values come with the clipped straight-through gradient `1{|x| <= input_clip * beta}` (with respect to
        `beta * sign(x)`), so gradients reach earlier layers; the packed weights themselves never receive one.
        """
        if not self.binary_inputs:
            return x
        if x.requires_grad and torch.is_grad_enabled():
            scale = self.input_scale.to(x.dtype) if self.input_scale is not None else 1.0
            return hard_sign(x, ste=True, scale=scale, bound=scale * self.input_clip, factored=True)
        return binary_sign(x)

    def output_scale(self) -> torch.Tensor | None:
        """`beta * alpha`, the factor of the layer output (see `output_scale`)."""
        return output_scale(self.input_scale, self.weight_scale, self.feature_ndim)

    def _binary_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        y = op(self.binarize_input(x), self.sign_weight(x.dtype), None)
        return scale_output(y, self.output_scale(), self.bias, self.feature_ndim)

    @classmethod
    def from_module(cls, module: nn.Module, config, unpack_cache: bool = False):
        """An empty packed module shaped like `module` (an `nn.Linear` / `nn.Conv2d`, on any device incl. meta)."""
        new = cls._empty_like(module, unpack_cache=unpack_cache, **cls.flags_from_config(config))
        new.input_clip = config.activation_clip
        return new

    @classmethod
    def from_stompp(cls, module: StoMPPMixin, unpack_cache: bool = False):
        """Pack a fully frozen training module: the result computes the frozen module's outputs bit for bit."""
        new = cls._empty_like(module, unpack_cache=unpack_cache, **module.binary_flags())
        if module.input_binarizer is not None:
            new.input_clip = module.input_binarizer.clip
        with torch.no_grad():
            w = full_tensor(module.weight.detach())
            if module.weight_binarizer is not None:
                new.weight_packed.copy_(pack_signs((w >= 0).reshape(w.shape[0], -1)))
                if new.weight_scale is not None:
                    new.weight_scale.copy_(module.weight_binarizer.weight_scale(w).reshape(-1))
            else:
                new.weight.copy_(w)
            if new.bias is not None:
                new.bias.copy_(full_tensor(module.bias.detach()))
            if new.input_scale is not None:
                new.input_scale.copy_(full_tensor(module.input_binarizer.scale))
        return new


class BinaryLinear(BinaryMixin, nn.Module):
    """Packed 1-bit inference twin of `StoMPPLinear`: `linear(sign(x), sign(W)) * (beta * alpha) + b`."""

    feature_ndim = 1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        binary_weights: bool = True,
        weight_scale: bool = True,
        binary_inputs: bool = True,
        input_scale: bool = True,
        unpack_cache: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_binary(
            (out_features, in_features),
            bias=bias,
            binary_weights=binary_weights,
            weight_scale=weight_scale,
            binary_inputs=binary_inputs,
            input_scale=input_scale,
            unpack_cache=unpack_cache,
            dtype=dtype,
            device=device,
        )

    @classmethod
    def _empty_like(cls, module: nn.Linear, **kwargs) -> BinaryLinear:
        w = module.weight
        return cls(
            module.in_features, module.out_features, module.bias is not None, dtype=w.dtype, device=w.device, **kwargs
        )

    def xnor_applies(self, x: torch.Tensor) -> str | None:
        """Why the XNOR kernel cannot compute this forward, or None when it can."""
        if not (self.binary_weights and self.binary_inputs):
            return "the layer does not binarize both its weights and its inputs"
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return f"the XNOR kernel takes float32 inputs on CPU, got {x.dtype} on {x.device.type}"
        tracked = (x, self.bias, self.weight_scale, self.input_scale)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tracked):
            return "autograd tracks this forward and the XNOR kernel has no backward pass"
        if any(t is not None and t.dtype != torch.float32 for t in (self.weight_scale, self.input_scale, self.bias)):
            return "the layer's scales or bias are not float32"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "reference":
            reason = self.xnor_applies(x)
            if reason is None and (self.kernel == "xnor" or xnor.is_available()):
                scale = self.output_scale()
                if scale is not None and scale.ndim == 0:  # beta alone: the same product for every output
                    scale = scale.expand(self.out_features)
                return xnor.xnor_linear(x, self.weight_packed, self.in_features, scale, self.bias)
            if self.kernel == "xnor" and reason is not None:
                raise ValueError(f"kernel='xnor' cannot run this forward: {reason}. Use kernel='auto' to fall back.")
        return self._binary_forward(x, F.linear)


class BinaryConv2d(BinaryMixin, nn.Module):
    """Packed 1-bit inference twin of `StoMPPConv2d`; padding is applied to the binarized input, as in training."""

    feature_ndim = 3

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        binary_weights: bool = True,
        weight_scale: bool = True,
        binary_inputs: bool = True,
        input_scale: bool = True,
        unpack_cache: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        # Reuse nn.Conv2d's argument normalisation (tuples, 'same' padding, reversed padding for padding_mode).
        ref = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False, padding_mode, "meta"
        )
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(ref, name))
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = ref._reversed_padding_repeated_twice
        self._init_binary(
            tuple(ref.weight.shape),
            bias=bias,
            binary_weights=binary_weights,
            weight_scale=weight_scale,
            binary_inputs=binary_inputs,
            input_scale=input_scale,
            unpack_cache=unpack_cache,
            dtype=dtype,
            device=device,
        )

    @classmethod
    def _empty_like(cls, module: nn.Conv2d, **kwargs) -> BinaryConv2d:
        w = module.weight
        return cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            dtype=w.dtype,
            device=w.device,
            **kwargs,
        )

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._binary_forward(x, self._conv)


#: Packed inference module for each convertible layer type (keys as in `STOMPP_MODULES`).
BINARY_MODULES: dict[type[nn.Module], type[BinaryMixin]] = {nn.Linear: BinaryLinear, nn.Conv2d: BinaryConv2d}
