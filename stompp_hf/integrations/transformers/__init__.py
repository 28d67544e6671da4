"""Transformers integration: the `HfQuantizer` for `quant_method="stompp"`, `StoMPPCallback`, model cards and Hub
uploads, the Transformers model policy, the `HfArgumentParser` options generated from `StoMPPConfig`, and
`DistillationTrainer` (knowledge distillation from a full-precision teacher).

Importing this package imports no Transformers code; its submodules do (the quantizer is imported, and so
registered, by `import stompp_hf`).
"""

from __future__ import annotations

from torch import nn

from ..._lazy import lazy_exports

_LAZY = {
    "StoMPPHfQuantizer": "quantizer",
    "attach_quantizer": "quantizer",
    "KEEP_LATENT_ATTR": "quantizer",
    "StoMPPCallback": "callback",
    "model_card": "hub",
    "push_to_hub": "hub",
    "is_stompp_model": "hub",
    "TransformersPolicy": "policy",
    "StoMPPArguments": "arguments",
    "DistillationConfig": "distillation",
    "DistillationTrainer": "distillation",
    "distillation_loss": "distillation",
}

__all__ = ["is_transformers_model", *_LAZY]


def is_transformers_model(model: nn.Module) -> bool:
    """True for Transformers models (duck-typed: a `config` and `get_output_embeddings`), without importing it."""
    return hasattr(model, "get_output_embeddings") and hasattr(model, "config")


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
