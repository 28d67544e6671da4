"""stompp_hf: StoMPP binarized training for Hugging Face models.

Importing this package registers `StoMPPConfig` and its quantizer with Transformers under `quant_method="stompp"`.
"""

from transformers.quantizers import register_quantization_config

from .config import StoMPPConfig
from .conversion import convert_model, prepare_model, stompp_modules
from .functional import binary_sign, masked_binarize
from .layers import Binarizer, StoMPPConv2d, StoMPPLinear
from .progression import ProgressionController, binarized, find_config
from .schedules import SCHEDULES, register_schedule

StoMPPConfig = register_quantization_config("stompp")(StoMPPConfig)

from .callback import StoMPPCallback  # noqa: E402
from .hf_quantizer import StoMPPHfQuantizer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SCHEDULES",
    "Binarizer",
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
    "prepare_model",
    "register_schedule",
    "stompp_modules",
]
