"""`HfArgumentParser` options generated from `StoMPPConfig`'s fields, so a script never restates them.

    parser = HfArgumentParser((ModelArguments, StoMPPArguments, TrainingArguments))
    ...
    config = stompp_args.to_config(seed=training_args.seed)

Every training field of the config becomes an option with the config's help text and default (override defaults
per script with `stompp_arguments(defaults={...})`). On a command line a field whose value may be None (`weights`,
`activations`, `compensation`, `export_dtype`) takes `none`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ...config import StoMPPConfig

#: Config fields that are not training options of a script: set by saving, fixed, per-model or seeded from
#: `TrainingArguments.seed`.
NOT_OPTIONS = ("packed", "quant_method", "modules_to_not_convert", "seed")


def none_str(value: Any) -> Any:
    """None for the strings 'none' / 'null' / '' (how a command line spells None); any other value unchanged."""
    return None if isinstance(value, str) and value.lower() in ("none", "null", "") else value


def _config_values(values: dict[str, Any]) -> dict[str, Any]:
    """The `StoMPPConfig` fields among `values`. A 'none' string becomes None only in fields that accept None
    (`weights="none"` is a BWN); elsewhere it is a value (`weight_scale="none"`)."""
    hints = typing.get_type_hints(StoMPPConfig)
    return {k: none_str(v) if type(None) in typing.get_args(hints[k]) else v for k, v in values.items() if k in hints}


def _to_config(self, seed: int | None = None, **overrides: Any) -> StoMPPConfig:
    """The `StoMPPConfig` these options describe, with `seed` and `overrides`."""
    values = _config_values({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
    if seed is not None:
        values["seed"] = seed
    return StoMPPConfig(**{**values, **overrides})


def stompp_arguments(
    name: str = "StoMPPArguments",
    *,
    defaults: dict[str, Any] | None = None,
    extra_fields: list[tuple[str, Any, dataclasses.Field]] | None = None,
    doc: str | None = None,
) -> type:
    """A dataclass with one field per training option of `StoMPPConfig` and a `to_config(seed=None, **overrides)`.

    Args:
        name: the class name.
        defaults: field -> default overriding the config's (e.g. `{"weights": "stompp_ste"}`).
        extra_fields: more `(name, type, dataclasses.field(...))` entries (script options that are not config fields).
        doc: the class docstring.

    Raises:
        ValueError: if `defaults` names a field that is not an option.
    """
    defaults = dict(defaults or {})
    fields = [f for f in dataclasses.fields(StoMPPConfig) if f.name not in NOT_OPTIONS]
    unknown = sorted(set(defaults) - {f.name for f in fields} - {e[0] for e in extra_fields or []})
    if unknown:
        raise ValueError(f"`defaults` names unknown StoMPP options {unknown}.")
    StoMPPConfig(**_config_values(defaults))  # validate the defaults
    hints = typing.get_type_hints(StoMPPConfig)  # real types: HfArgumentParser cannot resolve string annotations
    spec = []
    for f in fields:
        default = defaults.get(f.name, f.default)
        spec.append((f.name, hints[f.name], dataclasses.field(default=default, metadata=dict(f.metadata))))
    for extra_name, extra_type, extra_field in extra_fields or []:
        if extra_name in defaults:
            extra_field = dataclasses.field(default=defaults[extra_name], metadata=dict(extra_field.metadata))
        spec.append((extra_name, extra_type, extra_field))
    cls = dataclasses.make_dataclass(name, spec, namespace={"to_config": _to_config})
    cls.__module__ = __name__
    cls.__doc__ = doc or f"StoMPP options generated from `StoMPPConfig` ({', '.join(f.name for f in fields)})."
    return cls


#: The config's own defaults (the paper's).
StoMPPArguments = stompp_arguments()
