"""Knowledge distillation from a full-precision teacher (docs/design.md, "Distillation").

    from stompp_hf.distillation import DistillationConfig, DistillationTrainer, distillation_loss

The names are loaded on first access: the config, the loss and the `Trainer` subclass from
`stompp_hf.integrations.transformers.distillation` (which imports `transformers.Trainer`), the tensor losses from
`stompp_hf.core.distillation` (torch only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

_LAZY = {
    "DistillationConfig": "stompp_hf.integrations.transformers.distillation",
    "DistillationTrainer": "stompp_hf.integrations.transformers.distillation",
    "distillation_loss": "stompp_hf.integrations.transformers.distillation",
    "TEACHER_DTYPES": "stompp_hf.integrations.transformers.distillation",
    "logit_kd": "stompp_hf.core.distillation",
    "hidden_mse": "stompp_hf.core.distillation",
    "attention_mse": "stompp_hf.core.distillation",
    "layer_map": "stompp_hf.core.distillation",
}

__all__ = [
    "TEACHER_DTYPES",
    "DistillationConfig",
    "DistillationTrainer",
    "attention_mse",
    "distillation_loss",
    "hidden_mse",
    "layer_map",
    "logit_kd",
]

if TYPE_CHECKING:
    from .core.distillation import attention_mse, hidden_mse, layer_map, logit_kd
    from .integrations.transformers.distillation import (
        TEACHER_DTYPES,
        DistillationConfig,
        DistillationTrainer,
        distillation_loss,
    )

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
