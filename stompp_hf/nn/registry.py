"""The one registry of binarizable module kinds: source type <-> StoMPP training module <-> packed inference module.

Conversion, packing, reload and summaries all read it, so supporting a new layer type is one `register_module` call.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModuleKind:
    """A binarizable module kind: the float `source` type it replaces (None for modules that conversion inserts
    rather than swaps, such as `StoMPPActivation`), its `training` module and its `packed` module."""

    source: type[nn.Module] | None
    training: type[nn.Module]
    packed: type[nn.Module]


#: Every registered kind, in registration order.
MODULE_KINDS: list[ModuleKind] = []


def register_module(source: type[nn.Module] | None, training: type[nn.Module], packed: type[nn.Module]) -> ModuleKind:
    """Register how layers of the exact type `source` are trained (`training`) and packed (`packed`).

    Raises:
        ValueError: if `source` or `training` is registered already.
    """
    for kind in MODULE_KINDS:
        if source is not None and kind.source is source:
            raise ValueError(f"`{source.__name__}` is already registered as {kind}.")
        if kind.training is training:
            raise ValueError(f"`{training.__name__}` is already the training module of {kind}.")
    kind = ModuleKind(source, training, packed)
    MODULE_KINDS.append(kind)
    return kind


def is_convertible(module: nn.Module) -> bool:
    """Whether `module` is a float layer of a registered source type (what `convert_model` can binarize; exact
    types: a subclass of `nn.Linear` is not converted)."""
    return any(kind.source is type(module) for kind in MODULE_KINDS)


def packed_types() -> tuple[type[nn.Module], ...]:
    """Every registered packed module type (for `isinstance`)."""
    return tuple(kind.packed for kind in MODULE_KINDS)


def kind_of(module: nn.Module) -> ModuleKind:
    """The `ModuleKind` of a source layer, a training module or a packed module.

    Raises:
        ValueError: for a module of no registered kind.
    """
    for kind in MODULE_KINDS:
        if kind.source is type(module):
            return kind
    for kind in MODULE_KINDS:
        if isinstance(module, (kind.training, kind.packed)):
            return kind
    names = ", ".join(k.training.__name__ for k in MODULE_KINDS)
    raise ValueError(f"`{type(module).__name__}` is not a binarizable module kind (registered: {names}).")
