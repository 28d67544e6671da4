"""The `HfQuantizer` for `quant_method="stompp"`: flags and environment checks, delegating to `conversion`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers.quantizers import HfQuantizer, register_quantizer

from .conversion import convert_model
from .layers import StoMPPMixin

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@register_quantizer("stompp")
class StoMPPHfQuantizer(HfQuantizer):
    """Swaps every eligible `nn.Linear` for `StoMPPLinear` before the weights load; QAT-trainable with `Trainer`."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs) -> None:
        config = self.quantization_config
        convert_model(model, config)
        model.stompp_config = config
        if not self.pre_quantized:
            # A full-precision checkpoint has no activation scales yet: they are measured in training, not missing.
            ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
            model._keys_to_ignore_on_load_missing = ignore | {r"input_binarizer\.scale$"}

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        # An activation scale missing from the checkpoint (loading a full-precision model) was materialized as
        # uninitialized memory by `from_pretrained`; reset it to "not yet measured".
        for module in model.modules():
            if isinstance(module, StoMPPMixin):
                for binarizer in module.binarizers():
                    if binarizer.scale is not None and not getattr(binarizer.scale, "_is_hf_initialized", False):
                        binarizer.scale.zero_()
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True
