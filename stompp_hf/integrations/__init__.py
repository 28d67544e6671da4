"""Adapters at the edge: Transformers (quantizer, callback, Hub cards), timm (policy, save / load, Bi-Real Net),
peft (LoRA on packed layers) and sentence-transformers (its model cards).

Importing this package only registers the model-family policies with `stompp_hf.conversion`: each registration is
a cheap duck-typed test plus a loader, so no framework is imported until a model of its family is converted.
"""

from __future__ import annotations

from ..conversion import ModelPolicy, register_policy
from .timm import is_timm_model
from .transformers import is_transformers_model


def _timm_policy() -> ModelPolicy:
    from .timm.policy import TimmPolicy

    return TimmPolicy()


def _transformers_policy() -> ModelPolicy:
    from .transformers.policy import TransformersPolicy

    return TransformersPolicy()


# timm first: the more specific test (a timm model is never a Transformers model, but be explicit about the order)
register_policy("timm", is_timm_model, _timm_policy)
register_policy("transformers", is_transformers_model, _transformers_policy)
