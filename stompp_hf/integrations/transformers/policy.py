"""The Transformers model policy: what stays full precision in a `PreTrainedModel`, and what `prepare_model` attaches.

Transformers' own `HfQuantizer.get_modules_to_not_convert` picks the head (the module owning the last parameter),
the output embeddings and tied weights; `_keep_in_fp32_modules` is added. Embeddings, LayerNorm and attention
matmuls are not linear layers, so they stay full precision by construction; the pooler and encoder linears are
binarized (docs/design.md, "Precision policy").
"""

from __future__ import annotations

from torch import nn
from transformers.quantizers import HfQuantizer

from ...config import StoMPPConfig
from ...conversion import ModelPolicy


class TransformersPolicy(ModelPolicy):
    """Transformers models: head, output embeddings, tied weights and `_keep_in_fp32_modules` full precision."""

    name = "transformers"

    def modules_to_not_convert(self, model: nn.Module) -> list[str]:
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        if hasattr(model, "all_tied_weights_keys"):
            keys = HfQuantizer.get_modules_to_not_convert(model, keep_in_fp32_modules=keep)
        else:  # a model that only looks like a PreTrainedModel: the same rule without tied weights
            output = model.get_output_embeddings()
            last = list(model.named_parameters())[-1:]
            keys = [
                *keep,
                *(n for n, _ in last),
                *(n for n, m in model.named_modules() if output is not None and m is output),
            ]
        # Transformers names a head by its last parameter ("classifier.bias" stays a parameter name, only ".weight"
        # is stripped): name its module, which is what `modules_to_not_convert` matches.
        params = dict(model.named_parameters())
        return sorted({k.rsplit(".", 1)[0] if k in params else k for k in keys})

    def after_conversion(self, model: nn.Module, config: StoMPPConfig) -> None:
        # `prepare_model` on a Transformers model: attach the quantizer too, so `save_pretrained` / `push_to_hub` work
        # as after `from_pretrained(..., quantization_config=config)`.
        if hasattr(model, "save_pretrained"):
            from .quantizer import attach_quantizer

            attach_quantizer(model, config)
