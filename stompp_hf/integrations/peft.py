"""LoRA adapters (peft) on binarized models: a 1-bit base with full-precision adapters, the QLoRA pattern for 1 bit.

* **Packed base** (a packed checkpoint reloaded with `from_pretrained`: `BinaryLinear` layers holding 1-bit weights).
  peft does not know `BinaryLinear`; `stompp_lora_config(LoraConfig(...))` registers `LoraBinaryLinear` for it, so
  `get_peft_model` puts adapters on the packed layers. The base stays 1-bit (buffers, nothing trainable); the
  adapters see the layer's full-precision input. Adapters save with peft as usual; reload them onto a packed base
  with `load_lora_adapter` (peft does not store the custom-module mapping).
* **Latent base** (a StoMPP training model): `StoMPPLinear` *is* an `nn.Linear`, so peft wraps it with its own LoRA
  layer; freeze the progression first (a fully binary model) so the base's forward is the 1-bit network.

Merging: a binary layer plus a full-precision low-rank update is not a binary layer, so there is no exact merge
that stays 1-bit. `merge_lora_into_latent(peft_model)` merges into a *latent* StoMPP model instead: each adapted
packed layer becomes a `StoMPPLinear` whose latent weight is the packed layer's `alpha * sign(W)` plus the LoRA
update and whose masks are all frozen (latent adapted layers get the update added to their latent weight, as peft
merges). The result is a fully binary StoMPP model again: `save_pretrained` packs it, and its 1-bit weights are
`sign(alpha * sign(W) + delta W)`, i.e. the base's signs flipped wherever the update outweighs alpha. That changes
the function (the low-rank update is re-binarized), so evaluate the merged model, and fine-tune it further (e.g.
with `weights="ste"`) if it lost accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from ..conversion import policy_for, stage_numbers
from ..nn import BinaryLinear, StoMPPLinear
from ..progression import find_config


class LoraBinaryLinear(LoraLinear):
    """peft's LoRA `Linear` around a packed `BinaryLinear`: output = binary layer(x) + LoRA(x)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        reference = base_layer.weight_scale if base_layer.weight_scale is not None else base_layer.bias
        if reference is None:
            return base_layer.weight_packed.device, None
        return reference.device, reference.dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "A LoRA update cannot be merged into a packed 1-bit layer (the sum is not binary). Use "
            "`stompp_hf.integrations.peft.merge_lora_into_latent(peft_model)`, which merges into a latent StoMPP "
            "model that `save_pretrained` packs again."
        )


def stompp_lora_config(config: LoraConfig) -> LoraConfig:
    """Register the packed layers with a peft `LoraConfig` (in place) and return it:

    peft_model = get_peft_model(packed_model, stompp_lora_config(LoraConfig(r=8, target_modules=[...])))
    """
    config._register_custom_module({BinaryLinear: LoraBinaryLinear})
    return config


def load_lora_adapter(model: nn.Module, path: str, **kwargs: Any) -> nn.Module:
    """`PeftModel.from_pretrained(model, path)` for a packed base: the stored `LoraConfig` gets the packed layers
    registered (peft stores no custom-module mapping)."""
    config = stompp_lora_config(LoraConfig.from_pretrained(path))
    return PeftModel.from_pretrained(model, path, config=config, **kwargs)


@torch.no_grad()
def merge_lora_into_latent(peft_model: nn.Module) -> nn.Module:
    """Merge the active LoRA adapters of `peft_model` into a fully binary *latent* StoMPP model and return it.

    Packed layers with adapters become `StoMPPLinear` (latent weight = unpacked `alpha * sign(W)` + LoRA update,
    every mask frozen, activation scale kept); other adapted layers merge as peft merges them. The peft wrappers
    (and `modules_to_save` copies) are removed as by `merge_and_unload`.
    """
    base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    config = find_config(base_model)
    targets = [(name, m) for name, m in base_model.named_modules() if isinstance(m, LoraBinaryLinear)]
    names = [name for name, _ in targets]
    stages = stage_numbers(policy_for(base_model).stage_keys(base_model, names, config.granularity))
    for (name, module), stage in zip(targets, stages):
        packed = module.get_base_layer()
        weight = packed.unpacked_weight(torch.float32).float()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).float()
        dense = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None)
        dense.weight.copy_(weight.to(dense.weight.dtype))
        if packed.bias is not None:
            dense.bias.copy_(packed.bias)
        latent = StoMPPLinear.from_module(dense, config, stage=stage)
        for binarizer in latent.binarizers():
            binarizer.mask.fill(True)
        if latent.input_binarizer is not None and latent.input_binarizer.scale is not None:
            latent.input_binarizer.scale.copy_(packed.input_scale)
        base_model.set_submodule(name, latent)
    if hasattr(peft_model, "merge_and_unload"):
        return peft_model.merge_and_unload()
    return base_model
