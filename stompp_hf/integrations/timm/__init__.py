"""timm integration: the CNN policy (precision, stages, activations), timm-layout save / load, Bi-Real Net.

Importing this package imports nothing from timm; its submodules do.
"""

from __future__ import annotations

from torch import nn

from ..._lazy import lazy_exports

_LAZY = {
    "TimmPolicy": "policy",
    "cifar_stem": "policy",
    "default_modules_to_not_convert": "policy",
    "example_input": "policy",
    "inject_activations": "policy",
    "prepare_vision_model": "policy",
    "shortcut_layers": "policy",
    "stage_keys": "policy",
    "save_pretrained": "io",
    "from_pretrained": "io",
    "BiRealNet": "birealnet",
    "BiRealBlock": "birealnet",
    "CifarResNet": "cifar_resnet",
    "activation_sites": "policy",
}

__all__ = ["is_timm_model", *_LAZY]


def is_timm_model(model: nn.Module) -> bool:
    """True for models built by `timm.create_model` (they carry a `pretrained_cfg` dict and `group_matcher`)."""
    return isinstance(getattr(model, "pretrained_cfg", None), dict) and hasattr(model, "group_matcher")


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
