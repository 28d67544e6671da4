"""The `HfQuantizer` for `quant_method="stompp"`: thin glue delegating to `stompp_hf.conversion` and
`stompp_hf.export`.

* Loading a full-precision checkpoint, or a latent StoMPP checkpoint (`packed=False`): swap eligible layers for
  `StoMPPLinear` / `StoMPPConv2d` before the weights load.
* Loading a packed checkpoint (`packed=True`): swap exactly the layers the checkpoint packed (read from the
  safetensors headers; layers, shapes, dtypes and scales checked against the config) for `BinaryLinear` /
  `BinaryConv2d`, whose buffers then load as stored; the loaded scales are checked after loading. A checkpoint of
  the earlier layout (`<layer>.weight_packed`) is renamed to `<layer>.weight` on the fly.
* Saving (`get_state_dict_and_metadata`): a fully binary model outside training writes the packed state dict;
  otherwise the latent weights, so training can resume. `quantization_config.packed` records which.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from transformers.quantizers import HfQuantizer, register_quantizer

from ...conversion import convert_model, policy_for
from ...core.dtensor import full_tensor, is_sharded
from ...export import (
    checkpoint_format,
    convert_to_packed,
    holds_packed_tensors,
    packed_metadata,
    packed_state_dict,
    read_checkpoint_index,
    read_packed_digests,
    validate_packed_model,
)
from ...nn import BinaryMixin, StoMPPMixin
from ...nn.packed import LEGACY_PACKED_KEY
from ..peft_support import enable_peft_support
from .hub import attach_hub_support

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

#: Set on a model by `StoMPPCallback` while `Trainer.train` runs: checkpoints then keep latent weights to resume.
KEEP_LATENT_ATTR = "_stompp_keep_latent"


@register_quantizer("stompp")
class StoMPPHfQuantizer(HfQuantizer):
    """Binarizes eligible layers for StoMPP training, and saves / reloads fully binary models as packed 1-bit."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self._legacy_layout = False  # the checkpoint stores packed signs as `*.weight_packed`
        self._legacy_renaming = None  # the load-time renaming of that layout, dropped after loading
        self._digests: dict[str, str] = {}  # the checksums of the packed signs the checkpoint stored

    @property
    def loads_packed(self) -> bool:
        return self.pre_quantized and self.quantization_config.packed

    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: list[str] | None = None, **kwargs
    ) -> None:
        config = self.quantization_config
        index = read_checkpoint_index(checkpoint_files) if self.pre_quantized and checkpoint_files else None
        self._legacy_layout = index is not None and any(k.endswith("." + LEGACY_PACKED_KEY) for k in index)
        if self.loads_packed:
            convert_to_packed(model, config, index, base_model_prefix=getattr(model, "base_model_prefix", None))
            self._digests = read_packed_digests(checkpoint_files) if checkpoint_files else {}
        else:
            packed = holds_packed_tensors(index) if index is not None else []
            if packed:
                raise ValueError(
                    f"The checkpoint holds packed 1-bit tensors (e.g. `{packed[0]}`), but its quantization_config "
                    "says `packed: false` (a latent checkpoint): loading it would build randomly initialized "
                    "training layers. The config.json was edited or belongs to another checkpoint; set "
                    "`packed: true`."
                )
            policy = policy_for(model)
            resolved = policy.resolve(model, config)
            for key in ("granularity", "activation_sites"):  # written to config.json as resolved
                setattr(config, key, getattr(resolved, key))
            convert_model(model, config, policy=policy)
            ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
            # No masks in a full-precision checkpoint (they start continuous), nor in a latent one written before
            # masks were saved (they are replayed on resume).
            ignore.add(r"_binarizer\._extra_state$")
            if not self.pre_quantized:
                # A full-precision checkpoint has no activation scales yet: they are measured in training.
                ignore.add(r"input_binarizer\.scale$")
            if config.compensation == "surge":
                # SURGE's auxiliary weights start as copies of the latent weights (see below) unless a latent
                # checkpoint of a SURGE run stored them.
                ignore.add(r"surge_weight$")
            model._keys_to_ignore_on_load_missing = ignore
        model.stompp_config = config

    def update_weight_conversions(self, weight_conversions, model):
        """Rename `<layer>.weight_packed` (the earlier packed layout) to `<layer>.weight` while loading."""
        conversions = super().update_weight_conversions(weight_conversions, model)
        if self._legacy_layout:
            from transformers.core_model_loading import WeightRenaming

            self._legacy_renaming = WeightRenaming(rf"\.{LEGACY_PACKED_KEY}$", ".weight")
            conversions.append(self._legacy_renaming)
        return conversions

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        attach_hub_support(model)
        if self._legacy_renaming is not None and getattr(model, "_weight_conversions", None):
            # `save_pretrained` reverts the load-time conversions: a re-save writes the current layout.
            model._weight_conversions = [c for c in model._weight_conversions if c is not self._legacy_renaming]
        if self.loads_packed:
            validate_packed_model(model, self._digests, getattr(model, "base_model_prefix", None))
            enable_peft_support()
        for name, module in model.named_modules():
            if isinstance(module, StoMPPMixin):
                # An activation scale missing from the checkpoint (loading a full-precision model) was materialized
                # as uninitialized memory by `from_pretrained`; reset it to "not yet measured".
                for binarizer in module.binarizers():
                    if binarizer.scale is not None and not getattr(binarizer.scale, "_is_hf_initialized", False):
                        binarizer.scale.zero_()
                surge_weight = module.surge_weight
                if surge_weight is not None and not getattr(surge_weight, "_is_hf_initialized", False):
                    with torch.no_grad():
                        surge_weight.copy_(module.weight)
            elif isinstance(module, BinaryMixin):
                missing = [k for k, v in module.named_buffers() if not getattr(v, "_is_hf_initialized", False)]
                if missing:
                    raise ValueError(
                        f"The packed checkpoint has no {', '.join(f'`{name}.{k}`' for k in missing)}: it is "
                        "incomplete or does not match this model."
                    )
        return model

    def get_state_dict_and_metadata(self, model: PreTrainedModel):
        config = self.quantization_config
        fmt, reason = checkpoint_format(model, keep_latent=getattr(model, KEEP_LATENT_ATTR, False))
        config.packed = fmt == "packed"
        if fmt == "packed":
            state_dict = packed_state_dict(model, config.export_dtype)
            logger.info(
                f"StoMPP: wrote a packed 1-bit checkpoint ({reason}; remainder in "
                f"{config.export_dtype or 'the training dtype'})."
            )
            return state_dict, packed_metadata(state_dict)
        if getattr(model, KEEP_LATENT_ATTR, False):
            logger.info(f"StoMPP: saved a latent, resumable checkpoint ({reason}).")
        else:
            logger.warning(
                f"StoMPP: {reason}, so this is a latent checkpoint (full-precision weights, resumable), not a packed "
                "1-bit one. Finish the progression to export packed."
            )
        return _latent_state_dict(model), {"stompp_format": "latent"}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def _latent_state_dict(model: PreTrainedModel):
    """None (Transformers saves `model.state_dict()`), or, when parameters are sharded `DTensor`s (FSDP2), the
    gathered whole tensors: Transformers' `save_pretrained` does not gather them itself."""
    state = model.state_dict()
    if not any(is_sharded(v) for v in state.values()):
        return None
    return {k: full_tensor(v) for k, v in state.items()}


def attach_quantizer(model: PreTrainedModel, config) -> None:
    """Give a Transformers model converted by `prepare_model` what `from_pretrained` gives a loaded one: the
    quantizer (so `save_pretrained` packs and writes `quantization_config`), the config, and Hub support."""
    model.hf_quantizer = StoMPPHfQuantizer(config, pre_quantized=False)
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = "stompp"
    attach_hub_support(model)
