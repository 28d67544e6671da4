"""One recursive, filter-driven module swap for any `nn.Module`, the grouping of swapped modules into stages, and the
registry of model-family policies.

This module imports no integration. What differs between model families (which layers stay full precision, how
layers group into stages, what happens before and after the swap) is a `ModelPolicy`, registered by the
integrations (`stompp_hf.integrations`) with `register_policy`; a model no policy claims gets the generic one
(first and last convertible layer full precision, blocks from the outermost `nn.ModuleList` / `nn.Sequential`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from .config import StoMPPConfig
from .nn.registry import is_convertible, kind_of
from .nn.training import StoMPPMixin

FilterFn = Callable[[nn.Module, str], bool]


class ModelPolicy:
    """How StoMPP converts one family of models. Subclass it and override what differs from the generic behaviour."""

    #: Name shown in errors and registered under.
    name = "generic"

    def default_config(self) -> StoMPPConfig:
        """The config `prepare_model(model)` uses when none is given."""
        return StoMPPConfig()

    def modules_to_not_convert(self, model: nn.Module) -> list[str]:
        """Names / patterns kept full precision when `config.modules_to_not_convert` is None: the first and the last
        convertible layer (input layer and classifier)."""
        eligible = eligible_modules(model)
        if len(eligible) <= 2:
            return []
        return [eligible[0][0], eligible[-1][0]]

    def stage_keys(self, model: nn.Module, names: list[str], granularity: str) -> list[str]:
        """One key per converted module name; equal keys share a stage (see `block_keys`)."""
        return block_keys(model, names, granularity)

    def before_conversion(self, model: nn.Module, config: StoMPPConfig, filter_fn: FilterFn | None) -> StoMPPConfig:
        """Runs in `prepare_model` before the swap; returns the config to convert with (e.g. with resolved
        defaults)."""
        return config

    def after_conversion(self, model: nn.Module, config: StoMPPConfig) -> None:
        """Runs in `prepare_model` after the swap (e.g. to attach a quantizer)."""


@dataclass(frozen=True)
class _Entry:
    name: str
    applies: Callable[[nn.Module], bool]
    load: Callable[[], ModelPolicy]


_POLICIES: list[_Entry] = []
_LOADED: dict[str, ModelPolicy] = {}
GENERIC_POLICY = ModelPolicy()


def register_policy(name: str, applies: Callable[[nn.Module], bool], load: Callable[[], ModelPolicy]) -> None:
    """Register a model-family policy: `applies(model)` is a cheap test that imports nothing heavy, `load()` builds
    the policy on first use (so registering imports no framework). Policies registered first are tried first.

    Raises:
        ValueError: if `name` is registered already.
    """
    if any(entry.name == name for entry in _POLICIES):
        raise ValueError(f"A model policy named {name!r} is already registered.")
    _POLICIES.append(_Entry(name, applies, load))


def policy_for(model: nn.Module) -> ModelPolicy:
    """The registered policy that applies to `model`, or the generic one."""
    for entry in _POLICIES:
        if entry.applies(model):
            if entry.name not in _LOADED:
                _LOADED[entry.name] = entry.load()
            return _LOADED[entry.name]
    return GENERIC_POLICY


def eligible_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer of a registered binarizable type (`stompp_hf.nn.register_module`), by name, in order."""
    return [(n, m) for n, m in model.named_modules() if is_convertible(m)]


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """The paper's full-precision policy for `model`, read from the model by its family's policy:

    * Transformers models: the classifier / output head and `_keep_in_fp32_modules` (embeddings, LayerNorm and
      attention matmuls are not linear layers, so they stay full precision by construction).
    * timm models: first conv, classifier and shortcut convolutions.
    * Any other module: the first and the last convertible layer.
    """
    return policy_for(model).modules_to_not_convert(model)


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """True if `name` or an ancestor equals a pattern, ends with `.pattern`, or fully matches it as a regex."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for prefix in prefixes:
            if prefix == pattern or prefix.endswith("." + pattern):
                return True
            try:
                if re.fullmatch(pattern, prefix):
                    return True
            except re.error:
                continue
    return False


def block_keys(model: nn.Module, names: list[str], granularity: str) -> list[str]:
    """The stage key of each converted module: itself (`module`), or its block (`block`).

    A block is a child of the outermost `nn.ModuleList` / `nn.Sequential` containing the module (one encoder
    layer, one residual block); a module outside every container is a block of its own.
    """
    if granularity == "module":
        return list(names)
    containers = [n for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    keys = []
    for name in names:
        key = name
        for container in containers:  # named_modules lists outer containers first
            prefix = f"{container}." if container else ""
            if name.startswith(prefix) and name != container:
                child = name[len(prefix) :].split(".", 1)[0]
                key = prefix + child
                break
        keys.append(key)
    return keys


def stage_numbers(keys: list[str]) -> list[int]:
    """Stage index of each key: equal keys share a stage, numbered in order of first appearance."""
    stage_of: dict[str, int] = {}
    return [stage_of.setdefault(key, len(stage_of)) for key in keys]


def select_modules(
    model: nn.Module, config: StoMPPConfig, filter_fn: FilterFn | None = None
) -> list[tuple[str, nn.Module]]:
    """The layers `convert_model` binarizes: layers of a registered type not matched by
    `config.modules_to_not_convert` (or the model-aware defaults when it is None) and accepted by `filter_fn`.

    Raises:
        ValueError: if nothing is selected, naming the patterns that excluded layers.
    """
    skip = config.modules_to_not_convert
    if skip is None:
        skip = default_modules_to_not_convert(model)
    eligible = eligible_modules(model)
    targets = [
        (name, module)
        for name, module in eligible
        if not name_matches(name, skip) and (filter_fn is None or filter_fn(module, name))
    ]
    if not targets:
        raise ValueError(
            f"StoMPP converted no module of {type(model).__name__}: it looks for nn.Linear / nn.Conv2d layers not "
            f"matched by modules_to_not_convert={skip!r}"
            + (" and accepted by filter_fn" if filter_fn is not None else "")
            + f" (found {len(eligible)} such layers in total)."
        )
    return targets


def convert_model(
    model: nn.Module,
    config: StoMPPConfig,
    filter_fn: FilterFn | None = None,
    stage_keys: Callable[[nn.Module, list[str]], list[str]] | None = None,
    *,
    policy: ModelPolicy | None = None,
) -> dict[str, StoMPPMixin]:
    """Swap every layer `select_modules` picks for its StoMPP module in place; return them by name.

    Parameters are reused, never copied. Stages come from the model's policy (the execution order of the encoder /
    residual stacks), or from `stage_keys(model, names)` (one key per name; equal keys share a stage, numbered in
    order of first appearance).
    """
    targets = select_modules(model, config, filter_fn)
    names = [n for n, _ in targets]
    if stage_keys is not None:
        keys = stage_keys(model, names)
    else:
        keys = (policy or policy_for(model)).stage_keys(model, names, config.granularity)
    converted: dict[str, StoMPPMixin] = {}
    for (name, module), stage in zip(targets, stage_numbers(keys)):
        new = kind_of(module).training.from_module(module, config, stage=stage)
        model.set_submodule(name, new)
        converted[name] = new
    return converted


def stompp_modules(model: nn.Module) -> dict[str, StoMPPMixin]:
    """Every StoMPP training module of `model`, by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, StoMPPMixin)}


def prepare_model(
    model: nn.Module,
    config: StoMPPConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    policy: ModelPolicy | None = None,
) -> nn.Module:
    """Convert any `nn.Module` (timm CNN, custom model, Transformers model) for StoMPP training; return it.

    The model's policy (`policy_for(model)` unless `policy` is given) supplies the defaults (`config=None` gives the
    paper's CNN settings for timm models) and its hooks. The config is attached as `model.stompp_config`, which is
    where `StoMPPCallback` finds it.
    """
    policy = policy if policy is not None else policy_for(model)
    config = config if config is not None else policy.default_config()
    if stompp_modules(model):
        raise ValueError(f"{type(model).__name__} is already converted for StoMPP training.")
    config = policy.before_conversion(model, config, filter_fn)
    convert_model(model, config, filter_fn, policy=policy)
    model.stompp_config = config
    policy.after_conversion(model, config)
    return model
