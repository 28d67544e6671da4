"""The one registry of binarizable layer types: source type <-> StoMPP training module <-> packed inference module.

Conversion, packing, reload and summaries all read it, so supporting a new layer type is one `register_module` call.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModuleKind:
    """A binarizable layer type: the float `source` type, its `training` module and its `packed` module."""

    source: type[nn.Module]
    training: type[nn.Module]
    packed: type[nn.Module]


#: Every registered kind, keyed by its source type (exact types: subclasses of `nn.Linear` are not converted).
MODULE_KINDS: dict[type[nn.Module], ModuleKind] = {}


def register_module(source: type[nn.Module], training: type[nn.Module], packed: type[nn.Module]) -> ModuleKind:
    """Register how layers of the exact type `source` are trained (`training`) and packed (`packed`).

    Raises:
        ValueError: if `source` (or `training`) is registered already.
    """
    if source in MODULE_KINDS:
        raise ValueError(f"`{source.__name__}` is already registered as {MODULE_KINDS[source]}.")
    if any(kind.training is training for kind in MODULE_KINDS.values()):
        raise ValueError(f"`{training.__name__}` is already the training module of another layer type.")
    kind = ModuleKind(source, training, packed)
    MODULE_KINDS[source] = kind
    return kind


def is_convertible(module: nn.Module) -> bool:
    """Whether `module` is a float layer of a registered type (what `convert_model` can binarize)."""
    return type(module) in MODULE_KINDS


def kind_of(module: nn.Module) -> ModuleKind:
    """The `ModuleKind` of a source layer, a training module or a packed module.

    Raises:
        ValueError: for a module of no registered kind.
    """
    kind = MODULE_KINDS.get(type(module))
    if kind is not None:
        return kind
    for kind in MODULE_KINDS.values():
        if isinstance(module, (kind.training, kind.packed)):
            return kind
    names = ", ".join(k.__name__ for k in MODULE_KINDS)
    raise ValueError(f"`{type(module).__name__}` is not a binarizable layer type (registered: {names}).")
