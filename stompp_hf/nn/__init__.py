"""Modules: the `Binarizer`, the StoMPP training modules, the packed inference modules, and their registry.

Works on any `nn.Module`; imports torch and `stompp_hf.core` / `stompp_hf.kernels` only.
"""

from torch import nn as _nn

from ..core.functional import set_fused_ops as _set_fused_ops
from ..kernels import elementwise as _elementwise
from .activation import BinaryActivation, StoMPPActivation
from .base import StoMPPModule
from .binarizer import ACTIVATION_SCALE_MOMENTUM, Binarizer
from .packed import BinaryConv2d, BinaryLinear, BinaryMixin
from .registry import MODULE_KINDS, ModuleKind, is_convertible, kind_of, packed_types, register_module
from .training import StoMPPConv2d, StoMPPLinear, StoMPPMixin

register_module(_nn.Linear, StoMPPLinear, BinaryLinear)
register_module(_nn.Conv2d, StoMPPConv2d, BinaryConv2d)
register_module(None, StoMPPActivation, BinaryActivation)  # inserted at activation sites, never swapped in
if _elementwise.enabled():
    _set_fused_ops(_elementwise.CpuFusedOps())  # one C pass per group of elementwise ops; built on first use

__all__ = [
    "ACTIVATION_SCALE_MOMENTUM",
    "MODULE_KINDS",
    "BinaryActivation",
    "Binarizer",
    "BinaryConv2d",
    "BinaryLinear",
    "BinaryMixin",
    "ModuleKind",
    "StoMPPConv2d",
    "StoMPPLinear",
    "StoMPPActivation",
    "StoMPPMixin",
    "StoMPPModule",
    "is_convertible",
    "kind_of",
    "packed_types",
    "register_module",
]
