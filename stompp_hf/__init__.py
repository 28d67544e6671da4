"""stompp_hf: StoMPP binarized training for Hugging Face models.

Importing this package registers `StoMPPConfig` and its quantizer with Transformers under `quant_method="stompp"`
and the model-family policies with `stompp_hf.conversion`, and nothing else: every other export is loaded on first
access (PEP 562), so `import stompp_hf` loads no `Trainer`, peft, timm or datasets and patches nothing.
See docs/design.md for the layout.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from transformers.quantizers import register_quantization_config

from . import integrations  # noqa: F401  (registers the timm / Transformers model policies; imports neither)
from ._lazy import lazy_exports
from .config import StoMPPConfig
from .integrations.transformers.quantizer import StoMPPHfQuantizer

__version__ = "0.2.0.dev0"

StoMPPConfig = register_quantization_config("stompp")(StoMPPConfig)

#: Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    "SCHEDULES": "stompp_hf.core.schedules",
    "register_schedule": "stompp_hf.core.schedules",
    "binary_sign": "stompp_hf.core.functional",
    "masked_binarize": "stompp_hf.core.functional",
    "Binarizer": "stompp_hf.nn",
    "BinaryConv2d": "stompp_hf.nn",
    "BinaryLinear": "stompp_hf.nn",
    "StoMPPConv2d": "stompp_hf.nn",
    "StoMPPLinear": "stompp_hf.nn",
    "register_module": "stompp_hf.nn",
    "convert_model": "stompp_hf.conversion",
    "prepare_model": "stompp_hf.conversion",
    "stompp_modules": "stompp_hf.conversion",
    "ModelPolicy": "stompp_hf.conversion",
    "register_policy": "stompp_hf.conversion",
    "ProgressionController": "stompp_hf.progression",
    "binarized": "stompp_hf.progression",
    "find_config": "stompp_hf.progression",
    "recalibrate_batchnorm": "stompp_hf.progression",
    "pack_model": "stompp_hf.export",
    "packed_state_dict": "stompp_hf.export",
    "set_kernel": "stompp_hf.export",
    "set_unpack_cache": "stompp_hf.export",
    "ModelSummary": "stompp_hf.sizes",
    "summary": "stompp_hf.sizes",
    "StoMPPCallback": "stompp_hf.integrations.transformers.callback",
    "StoMPPArguments": "stompp_hf.integrations.transformers.arguments",
    "DistillationConfig": "stompp_hf.integrations.transformers.distillation",
    "DistillationTrainer": "stompp_hf.integrations.transformers.distillation",
}

#: Modules that moved in 0.2 and forward with a DeprecationWarning for one release (`stompp_hf._deprecation`).
_OLD_MODULES = (
    "birealnet",
    "callback",
    "functional",
    "hf_quantizer",
    "hub",
    "layers",
    "lora",
    "masks",
    "schedules",
    "vision",
    "xnor",
)

__all__ = [
    "Binarizer",
    "BinaryConv2d",
    "BinaryLinear",
    "DistillationConfig",
    "DistillationTrainer",
    "ModelPolicy",
    "ModelSummary",
    "ProgressionController",
    "SCHEDULES",
    "StoMPPArguments",
    "StoMPPCallback",
    "StoMPPConfig",
    "StoMPPConv2d",
    "StoMPPHfQuantizer",
    "StoMPPLinear",
    "__version__",
    "binarized",
    "binary_sign",
    "convert_model",
    "find_config",
    "masked_binarize",
    "pack_model",
    "packed_state_dict",
    "prepare_model",
    "recalibrate_batchnorm",
    "register_module",
    "register_policy",
    "register_schedule",
    "set_kernel",
    "set_unpack_cache",
    "stompp_modules",
    "summary",
]

if TYPE_CHECKING:
    from .conversion import ModelPolicy, convert_model, prepare_model, register_policy, stompp_modules
    from .core.functional import binary_sign, masked_binarize
    from .core.schedules import SCHEDULES, register_schedule
    from .export import pack_model, packed_state_dict, set_kernel, set_unpack_cache
    from .integrations.transformers.arguments import StoMPPArguments
    from .integrations.transformers.callback import StoMPPCallback
    from .integrations.transformers.distillation import DistillationConfig, DistillationTrainer
    from .nn import Binarizer, BinaryConv2d, BinaryLinear, StoMPPConv2d, StoMPPLinear, register_module
    from .progression import ProgressionController, binarized, find_config
    from .sizes import ModelSummary, summary


_lazy_getattr, __dir__ = lazy_exports(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    if name in _OLD_MODULES:  # `stompp_hf.layers` & co. as attributes, as `import stompp_hf` used to give them
        import warnings

        from ._deprecation import OLD_MODULES

        warnings.warn(
            f"`stompp_hf.{name}` is deprecated and will be removed in the next release: import from "
            f"`{OLD_MODULES[name][0]}` instead.",
            DeprecationWarning,
            stacklevel=2,  # the user's line (the module's own warning would point into importlib)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(f"stompp_hf.{name}")
    return _lazy_getattr(name)
