"""stompp_hf: StoMPP binarized training for Hugging Face models.

Importing this package registers `StoMPPConfig` and its quantizer with Transformers under `quant_method="stompp"`.
"""

from transformers.quantizers import register_quantization_config

from .config import StoMPPConfig
from .conversion import convert_model, prepare_model, stompp_modules
from .export import pack_model, packed_state_dict, set_kernel, set_unpack_cache
from .functional import binary_sign, masked_binarize
from .layers import Binarizer, BinaryConv2d, BinaryLinear, StoMPPConv2d, StoMPPLinear
from .progression import ProgressionController, binarized, find_config
from .schedules import SCHEDULES, register_schedule
from .sizes import ModelSummary, summary

StoMPPConfig = register_quantization_config("stompp")(StoMPPConfig)

from . import hub  # noqa: E402,F401  (wraps Trainer.create_model_card for StoMPP models)
from .callback import StoMPPCallback  # noqa: E402
from .hf_quantizer import StoMPPHfQuantizer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SCHEDULES",
    "BinaryConv2d",
    "BinaryLinear",
    "Binarizer",
    "ModelSummary",
    "ProgressionController",
    "StoMPPCallback",
    "StoMPPConfig",
    "StoMPPConv2d",
    "StoMPPHfQuantizer",
    "StoMPPLinear",
    "binarized",
    "binary_sign",
    "convert_model",
    "find_config",
    "masked_binarize",
    "pack_model",
    "packed_state_dict",
    "prepare_model",
    "register_schedule",
    "set_kernel",
    "set_unpack_cache",
    "stompp_modules",
    "summary",
]
