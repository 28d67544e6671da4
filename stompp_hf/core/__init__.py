"""The math of StoMPP, on torch alone: the masked binarize and SURGE autograd Functions, the schedules and their
registry, mask state with soft refresh, and sign bit packing (docs/design.md, "Core").

Nothing here imports transformers, timm, peft or datasets, nor any other part of `stompp_hf`.
"""

from .functional import RULES, binary_sign, hard_sign, masked_binarize
from .masks import MaskState, make_generator, mix_seed, sample_distinct
from .packing import EXPORT_DTYPES, pack_signs, unpack_signs
from .schedules import ORDERS, SCHEDULES, get_schedule, register_schedule, stage_progress
from .surge import surge

__all__ = [
    "EXPORT_DTYPES",
    "ORDERS",
    "RULES",
    "SCHEDULES",
    "MaskState",
    "binary_sign",
    "get_schedule",
    "hard_sign",
    "make_generator",
    "masked_binarize",
    "mix_seed",
    "pack_signs",
    "register_schedule",
    "sample_distinct",
    "stage_progress",
    "surge",
    "unpack_signs",
]
