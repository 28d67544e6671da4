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
from dataclasses import dataclass, field

from torch import nn

from .config import StoMPPConfig, check_pattern
from .nn.activation import StoMPPActivation
from .nn.base import StoMPPModule
from .nn.registry import is_convertible, kind_of

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class ConversionPlan:
    """What `convert_model` does to one model, as its policy planned it.

    Attributes:
        config: the config to convert with, its model-aware defaults resolved (`granularity`, `activation_sites`).
        input_shapes: per-sample input shape of layers whose type does not fix it (a convolution's `[C, H, W]`),
            so their input masks exist from conversion on.
        activations: activation modules to replace by `StoMPPActivation` (`activation_sites="activation"`), with
            the per-sample shape of their output.
        order: module names in execution order (stages are numbered in it); None: registration order.
    """

    config: StoMPPConfig
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    activations: dict[str, tuple[int, ...]] = field(default_factory=dict)
    order: list[str] | None = None


class ModelPolicy:
    """How StoMPP converts one family of models. Subclass it and override what differs from the generic behaviour."""

    #: Name shown in errors and registered under.
    name = "generic"
    #: `granularity` and `activation_sites` when the config leaves them None.
    default_granularity = "block"
    default_activation_sites = "input"

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
        """One key per converted module name for `granularity` "block" or "module"; equal keys share a stage (see
        `block_keys`)."""
        return block_keys(model, names, granularity)

    def resolve(self, model: nn.Module, config: StoMPPConfig) -> StoMPPConfig:
        """`config` with its model-aware defaults (None fields) filled in; the same object when nothing is None."""
        values = {}
        if config.granularity is None:
            values["granularity"] = self.default_granularity
        if config.activation_sites is None:
            values["activation_sites"] = self.default_activation_sites
        return StoMPPConfig.from_dict({**config.to_dict(), **values}) if values else config

    def plan(self, model: nn.Module, config: StoMPPConfig, filter_fn: FilterFn | None) -> ConversionPlan:
        """Runs in `prepare_model` before the swap: resolve the config and say what to convert."""
        return ConversionPlan(self.resolve(model, config))

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
    """True if `name` or an ancestor equals a pattern, ends with `.pattern`, or fully matches it as a regex.

    Raises:
        ValueError: naming a pattern that is not a valid regular expression (`config.check_pattern`).
    """
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if any(prefix == pattern or prefix.endswith("." + pattern) for prefix in prefixes):
            return True
        check_pattern(pattern)
        if any(re.fullmatch(pattern, prefix) for prefix in prefixes):
            return True
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
    plan: ConversionPlan | None = None,
) -> dict[str, StoMPPModule]:
    """Swap every layer `select_modules` picks for its StoMPP module in place (and, at activation sites, every
    planned activation for a `StoMPPActivation`); number the stages; return the new modules by name.

    Parameters are reused, never copied. Stages follow the execution order (`plan.order`, else registration order):
    with `granularity="layer"` every binarized tensor is its own stage (a layer's input before its weight); with
    "block" / "module" the tensors of one block / module share one, keyed by the policy's `stage_keys` or by
    `stage_keys(model, names)` (one key per module name; equal keys share a stage, numbered in order of first
    appearance). `config.granularity` / `activation_sites` left None take the policy's defaults.
    """
    policy = policy or policy_for(model)
    plan = plan or ConversionPlan(policy.resolve(model, config))
    config = plan.config
    at_activations = config.activation_sites == "activation" and config.activations is not None
    if at_activations and not plan.activations:
        raise ValueError(
            f"`activation_sites` 'activation' found no activation sites in {type(model).__name__}: its policy "
            f"({policy.name!r}) does not locate activation functions (the timm policy does, from a traced forward). "
            "Use activation_sites='input' to binarize each layer's own input."
        )
    converted: dict[str, StoMPPModule] = {}
    if config.weights is not None or not at_activations:
        for name, module in select_modules(model, config, filter_fn):
            new = kind_of(module).training.from_module(
                module, config, input_shape=plan.input_shapes.get(name), binarize_input=not at_activations
            )
            model.set_submodule(name, new)
            converted[name] = new
    if at_activations:
        for name, shape in plan.activations.items():
            replaced = type(model.get_submodule(name)).__name__
            new = StoMPPActivation.from_config(config, shape, replaces=replaced)
            model.set_submodule(name, new)
            converted[name] = new
    position = {n: i for i, n in enumerate(plan.order or [n for n, _ in model.named_modules()])}
    names = sorted(converted, key=lambda n: position.get(n, len(position)))
    _number_stages(model, {n: converted[n] for n in names}, config.granularity, policy, stage_keys)
    return {n: converted[n] for n in names}


def _number_stages(
    model: nn.Module,
    modules: dict[str, StoMPPModule],
    granularity: str,
    policy: ModelPolicy,
    stage_keys: Callable[[nn.Module, list[str]], list[str]] | None,
) -> None:
    """Set `Binarizer.stage` of every tensor of `modules` (given in execution order)."""
    names = list(modules)
    if granularity == "layer":
        tensors = [(n, b) for n in names for b in (modules[n].input_binarizer, modules[n].weight_binarizer) if b]
        for stage, (_, binarizer) in enumerate(tensors):
            binarizer.stage = stage
        return
    keys = stage_keys(model, names) if stage_keys is not None else policy.stage_keys(model, names, granularity)
    for name, stage in zip(names, stage_numbers(keys)):
        modules[name].stompp_stage = stage


def stompp_modules(model: nn.Module) -> dict[str, StoMPPModule]:
    """Every StoMPP training module of `model` (layers and activations), by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, StoMPPModule)}


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
    plan = policy.plan(model, config, filter_fn)
    convert_model(model, plan.config, filter_fn, policy=policy, plan=plan)
    model.stompp_config = plan.config
    policy.after_conversion(model, plan.config)
    return model
