"""LoRA adapters (peft) on binarized models: a 1-bit base with full-precision adapters, the QLoRA pattern for 1 bit.

* **Packed base** (a packed checkpoint reloaded with `from_pretrained`: `BinaryLinear` / `BinaryConv2d` layers
  holding 1-bit weights). peft has no LoRA layer for them; `LoraBinaryLinear` and `LoraBinaryConv2d` are registered
  through peft's own extension point for custom layers (`LoraConfig._register_custom_module`). peft neither stores
  that mapping with an adapter nor asks the model for one, so `register_with_peft()` registers it on every
  `LoraConfig` at the moment peft picks the LoRA layer of a packed target (a wrap of `LoraModel._create_new_module`
  that touches packed targets only; every other target goes through peft unchanged). It runs when a packed model
  is loaded (the quantizer, `stompp_hf.integrations.timm.from_pretrained`) and when this module is imported, so the
  plain peft calls work on packed models: `get_peft_model`, `PeftModel.from_pretrained`,
  `AutoPeftModelFor*.from_pretrained`, Transformers' `model.load_adapter` and `pipeline(model=adapter_dir)`. The base
  stays 1-bit (buffers, nothing trainable); the adapters see the layer's full-precision input.
* **Latent base** (a StoMPP training model): `StoMPPLinear` / `StoMPPConv2d` *are* `nn.Linear` / `nn.Conv2d`, so
  peft wraps them with its own LoRA layers; freeze the progression first (a fully binary model) so the base's
  forward is the 1-bit network.

Merging: a binary layer plus a full-precision low-rank update is not a binary layer, so there is no exact merge
that stays 1-bit (`merge_adapter` / `merge_and_unload` raise on packed layers). `merge_lora_into_latent(peft_model)`
merges into a *latent* StoMPP model instead: each adapted packed layer becomes a `StoMPPLinear` / `StoMPPConv2d`
whose latent weight is the packed layer's `alpha * sign(W)` plus the LoRA update and whose masks are all frozen
(latent adapted layers get the update added to their latent weight, as peft merges). The result is a fully binary
StoMPP model again: `save_pretrained` packs it, and its 1-bit weights are `sign(alpha * sign(W) + delta W)`, i.e. the
base's signs flipped wherever the update outweighs alpha. That changes the function (the low-rank update is
re-binarized), so evaluate the merged model, and fine-tune it further (e.g. with `weights="ste"`) if it lost accuracy.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Conv2d as LoraConv2d
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..conversion import policy_for, stage_numbers
from ..core.masks import MaskState
from ..nn import BinaryConv2d, BinaryLinear, StoMPPConv2d, StoMPPLinear
from ..progression import find_config

#: `init_lora_weights` values that initialise the adapters alone. The others (PiSSA, OLoRA, LoftQ, CorDA, ...)
#: decompose the base weight, which a packed layer holds as sign bits only.
PACKED_LORA_INITS = (True, False, "gaussian")


def _check_lora_config(config: LoraConfig, layer: nn.Module) -> None:
    if getattr(config, "use_dora", False):
        raise ValueError(
            "DoRA (`use_dora=True`) needs the base layer's full-precision weight, which the packed 1-bit "
            f"{type(layer).__name__} does not have; use plain LoRA on packed layers."
        )
    init = config.init_lora_weights
    if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
        raise ValueError(
            f"`init_lora_weights={init!r}` initialises LoRA from the base layer's full-precision weight, which the "
            f"packed 1-bit {type(layer).__name__} does not have; use one of {PACKED_LORA_INITS} on packed layers."
        )


class _PackedLoraLayer:
    """What the LoRA layers of packed modules share: their geometry, device and dtype come from the packed layer
    (whose `weight` is uint8 sign bits), no peft variant (DoRA & co. need the base weight), no in-place merge."""

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype | None]:
        for reference in (base_layer.weight_scale, base_layer.bias, base_layer.input_scale):
            if reference is not None:
                return reference.device, reference.dtype
        return base_layer.weight.device, None

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(
                f"The LoRA variant {type(variant).__name__} needs the base layer's full-precision weight, which the "
                f"packed 1-bit {type(self.get_base_layer()).__name__} does not have; use plain LoRA on packed layers."
            )
        return None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "A LoRA update cannot be merged into a packed 1-bit layer (the sum is not binary). Use "
            "`stompp_hf.integrations.peft.merge_lora_into_latent(peft_model)`, which merges into a latent StoMPP "
            "model that `save_pretrained` packs again."
        )


class LoraBinaryLinear(_PackedLoraLayer, LoraLinear):
    """peft's LoRA `Linear` around a packed `BinaryLinear`: output = binary layer(x) + B(A(x)) * scaling."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        _check_lora_config(config, self.get_base_layer())
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)


class LoraBinaryConv2d(_PackedLoraLayer, LoraConv2d):
    """peft's LoRA `Conv2d` around a packed `BinaryConv2d`: output = binary conv(x) + B(A(x)) * scaling, with A a
    convolution of the base's geometry (kernel, stride, padding, dilation, padding mode) down to `r` channels and B a
    1x1 convolution (grouped as the base) back to the output channels.

    peft's own conv layer reads its geometry from the base weight's shape and builds its adapters with the base's
    class; a packed layer's weight is `[out, ceil(K / 8)]` sign bits, so this layer builds `nn.Conv2d` adapters.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        packed = self.get_base_layer()
        if r % packed.groups != 0:
            raise ValueError(
                f"LoRA rank {r} on a BinaryConv2d with groups={packed.groups}: the rank must be divisible by groups."
            )
        self._active_adapter = adapter_name
        self._kernel_dim = 4
        self.conv_fn = F.conv2d
        #: The per-sample input shape `[C, H, W]` of the last forward: `merge_lora_into_latent` sizes the merged
        #: layer's input mask with it.
        self.input_shape: tuple[int, ...] | None = None
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_channels, module.out_channels

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        _check_lora_config(config, self.get_base_layer())
        if hasattr(LoraLayer, "resolve_lora_variant"):  # peft >= 0.16: any other variant raises too
            self.resolve_lora_variant(config=config)
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        packed = self.get_base_layer()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        dropout = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Conv2d(
            self.in_features,
            r,
            packed.kernel_size,
            packed.stride,
            packed.padding,
            packed.dilation,
            bias=False,
            padding_mode=packed.padding_mode,
        )
        self.lora_B[adapter_name] = nn.Conv2d(r, self.out_features, 1, groups=packed.groups, bias=config.lora_bias)
        self.lora_bias[adapter_name] = config.lora_bias
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """`scaling * B @ A` as a weight of the base's shape `[out, in, kh, kw]` (ungrouped base layers only)."""
        if self.get_base_layer().groups != 1:
            raise ValueError("The LoRA update of a grouped convolution is no grouped kernel: it cannot be merged.")
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float().flatten(1)
        return (torch.einsum("or,rikl->oikl", b, a) * self.scaling[adapter]).to(self.lora_A[adapter].weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.input_shape = tuple(x.shape[1:])
        return super().forward(x, *args, **kwargs)


#: Packed module type -> its LoRA layer: the mapping registered with peft.
PACKED_LORA_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    BinaryLinear: LoraBinaryLinear,
    BinaryConv2d: LoraBinaryConv2d,
}


def stompp_lora_config(config: LoraConfig) -> LoraConfig:
    """Register the packed layers with a peft `LoraConfig` (in place) and return it. Not needed with
    `register_with_peft` in effect (after loading a packed model, or importing this module); kept for explicit use:

    peft_model = get_peft_model(packed_model, stompp_lora_config(LoraConfig(r=8, target_modules=[...])))
    """
    config._register_custom_module(PACKED_LORA_LAYERS)
    return config


def register_with_peft() -> None:
    """Let peft put LoRA on packed layers for any `LoraConfig` (idempotent).

    peft chooses the LoRA layer of each target in `LoraModel._create_new_module`, trying the config's custom modules
    first. The wrap registers `PACKED_LORA_LAYERS` on the config (`LoraConfig._register_custom_module`, for the
    packed types it does not map yet) when the target is a packed layer, then calls peft's own method; other
    targets reach it untouched.
    """
    original = inspect.getattr_static(LoraModel, "_create_new_module")
    function = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(function, "_stompp_wrapped", False):
        return

    @functools.wraps(function)
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, tuple(PACKED_LORA_LAYERS)) and isinstance(lora_config, LoraConfig):
            custom = lora_config._custom_modules or {}
            missing = {kind: layer for kind, layer in PACKED_LORA_LAYERS.items() if kind not in custom}
            if missing:  # a mapping the user registered for a packed type stays theirs
                lora_config._register_custom_module(missing)
        return function(lora_config, adapter_name, target, **kwargs)

    _create_new_module._stompp_wrapped = True
    LoraModel._create_new_module = staticmethod(_create_new_module)


def load_lora_adapter(model: nn.Module, path: str, **kwargs: Any) -> nn.Module:
    """`PeftModel.from_pretrained(model, path, **kwargs)` (which works on packed bases as it is; kept for the
    callers of earlier releases)."""
    config = stompp_lora_config(LoraConfig.from_pretrained(path))
    return PeftModel.from_pretrained(model, path, config=config, **kwargs)


def _latent_twin(packed: nn.Module, weight: torch.Tensor, config, stage: int, input_shape) -> nn.Module:
    """A fully frozen StoMPP training module computing `weight` (binarized) in `packed`'s geometry."""
    if isinstance(packed, BinaryLinear):
        dense = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None)
        cls = StoMPPLinear
    else:
        dense = nn.Conv2d(
            packed.in_channels,
            packed.out_channels,
            packed.kernel_size,
            packed.stride,
            packed.padding,
            packed.dilation,
            packed.groups,
            packed.bias is not None,
            packed.padding_mode,
        )
        cls = StoMPPConv2d
    dense.to(device=weight.device, dtype=packed.bias.dtype if packed.bias is not None else weight.dtype)
    dense.weight.copy_(weight.to(dense.weight.dtype))
    if packed.bias is not None:
        dense.bias.copy_(packed.bias)
    latent = cls.from_module(dense, config, stage=stage, input_shape=input_shape, binarize_input=packed.binary_inputs)
    for binarizer in latent.binarizers():
        if binarizer.mask is None:
            binarizer.mask = MaskState(input_shape)
        binarizer.mask.fill(True)
    if latent.input_binarizer is not None and latent.input_binarizer.scale is not None:
        latent.input_binarizer.scale.copy_(packed.input_scale)
    return latent


@torch.no_grad()
def merge_lora_into_latent(peft_model: nn.Module) -> nn.Module:
    """Merge the active LoRA adapters of `peft_model` into a fully binary *latent* StoMPP model and return it.

    Packed layers with adapters become `StoMPPLinear` / `StoMPPConv2d` (latent weight = unpacked `alpha * sign(W)` +
    LoRA update, every mask frozen, activation scale kept); other adapted layers merge as peft merges them. The peft
    wrappers (and `modules_to_save` copies) are removed as by `merge_and_unload`.

    Raises:
        ValueError: for an adapted packed convolution that binarizes its input but never ran a forward pass (its
            input mask needs the per-sample input shape), or a grouped one (no merged kernel exists).
    """
    base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    config = find_config(base_model)
    targets = [(n, m) for n, m in base_model.named_modules() if isinstance(m, (LoraBinaryLinear, LoraBinaryConv2d))]
    names = [name for name, _ in targets]
    stages = stage_numbers(policy_for(base_model).stage_keys(base_model, names, config.granularity))
    for (name, module), stage in zip(targets, stages):
        packed = module.get_base_layer()
        input_shape = None
        if isinstance(module, LoraBinaryConv2d) and packed.binary_inputs:
            input_shape = module.input_shape
            if input_shape is None:
                raise ValueError(
                    f"`{name}` binarizes its input, and the merged layer's input mask needs the input's shape: run "
                    "one forward pass at the deployment resolution before merging."
                )
        weight = packed.unpacked_weight(torch.float32).float()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).float()
        base_model.set_submodule(name, _latent_twin(packed, weight, config, stage, input_shape))
    if hasattr(peft_model, "merge_and_unload"):
        return peft_model.merge_and_unload()
    return base_model


register_with_peft()
