"""One recursive, filter-driven module swap for any `nn.Module`, and the grouping of swapped modules into stages.

Works on plain PyTorch models and on Transformers models alike (this module imports no transformers code): the
model-aware defaults read `get_output_embeddings()` / `_keep_in_fp32_modules` when the model has them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn

from .config import StoMPPConfig
from .layers import STOMPP_MODULES, StoMPPMixin

FilterFn = Callable[[nn.Module, str], bool]


def _is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and hasattr(model, "config")


def _is_timm_model(model: nn.Module) -> bool:
    # Mirrors `vision.is_timm_model` without importing timm (only `stompp_hf.vision` imports it).
    return isinstance(getattr(model, "pretrained_cfg", None), dict) and hasattr(model, "group_matcher")


def _eligible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m) in STOMPP_MODULES]


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """The paper's full-precision policy, read from the model rather than from hard-coded names.

    * Transformers models: the classifier / output head (the module owning the last parameter, and the output
      embeddings) and `_keep_in_fp32_modules`. Embeddings, LayerNorm and attention matmuls are not linear layers,
      so they stay full precision by construction; the pooler and encoder linears are binarized.
    * timm models: first conv, classifier and shortcut convolutions (`stompp_hf.vision`).
    * Any other module: the first and the last convertible layer (input layer and classifier).
    """
    if _is_timm_model(model):
        from .vision import default_modules_to_not_convert as timm_defaults

        return timm_defaults(model)
    if _is_hf_model(model):
        names = set()
        params = list(model.named_parameters())
        if params:
            names.add(params[-1][0].rsplit(".", 1)[0])
        output = model.get_output_embeddings()
        if output is not None:
            names.update(n for n, m in model.named_modules() if m is output)
        names.update(getattr(model, "_keep_in_fp32_modules", None) or [])
        return sorted(names)
    eligible = _eligible(model)
    if len(eligible) <= 2:
        return []
    return [eligible[0][0], eligible[-1][0]]


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


def _stage_keys(model: nn.Module, names: list[str], granularity: str) -> list[str]:
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


def select_modules(
    model: nn.Module, config: StoMPPConfig, filter_fn: FilterFn | None = None
) -> list[tuple[str, nn.Module]]:
    """The layers `convert_model` binarizes: `nn.Linear` / `nn.Conv2d` not matched by
    `config.modules_to_not_convert` (or the model-aware defaults when it is None) and accepted by `filter_fn`.

    Raises:
        ValueError: if nothing is selected, naming the patterns that excluded layers.
    """
    skip = config.modules_to_not_convert
    if skip is None:
        skip = default_modules_to_not_convert(model)
    targets = [
        (name, module)
        for name, module in _eligible(model)
        if not name_matches(name, skip) and (filter_fn is None or filter_fn(module, name))
    ]
    if not targets:
        raise ValueError(
            f"StoMPP converted no module of {type(model).__name__}: it looks for nn.Linear / nn.Conv2d layers not "
            f"matched by modules_to_not_convert={skip!r}"
            + (" and accepted by filter_fn" if filter_fn is not None else "")
            + f" (found {len(_eligible(model))} such layers in total)."
        )
    return targets


def convert_model(
    model: nn.Module,
    config: StoMPPConfig,
    filter_fn: FilterFn | None = None,
    stage_keys: Callable[[nn.Module, list[str]], list[str]] | None = None,
) -> dict[str, StoMPPMixin]:
    """Swap every layer `select_modules` picks for its StoMPP module in place; return them by name.

    Parameters are reused, never copied. Stages are assigned in registration order (the execution order of the
    encoder / residual stacks), or by `stage_keys(model, names)` (one key per name; equal keys share a stage,
    numbered in order of first appearance).
    """
    targets = select_modules(model, config, filter_fn)
    names = [n for n, _ in targets]
    keys = stage_keys(model, names) if stage_keys is not None else _stage_keys(model, names, config.granularity)
    stage_of: dict[str, int] = {}
    converted: dict[str, StoMPPMixin] = {}
    for (name, module), key in zip(targets, keys):
        stage = stage_of.setdefault(key, len(stage_of))
        new = STOMPP_MODULES[type(module)].from_module(module, config, stage=stage)
        model.set_submodule(name, new)
        converted[name] = new
    return converted


def stompp_modules(model: nn.Module) -> dict[str, StoMPPMixin]:
    """Every StoMPP training module of `model`, by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, StoMPPMixin)}


def prepare_model(
    model: nn.Module, config: StoMPPConfig | None = None, filter_fn: FilterFn | None = None
) -> nn.Module:
    """Convert any `nn.Module` (timm CNN, custom model, Transformers model) for StoMPP training; return it.

    The config is attached as `model.stompp_config`, which is where `StoMPPCallback` finds it.
    """
    if _is_timm_model(model):
        from .vision import prepare_vision_model

        return prepare_vision_model(model, config, filter_fn)
    config = config if config is not None else StoMPPConfig()
    if stompp_modules(model):
        raise ValueError(f"{type(model).__name__} is already converted for StoMPP training.")
    convert_model(model, config, filter_fn)
    model.stompp_config = config
    if _is_hf_model(model) and hasattr(model, "save_pretrained"):
        # A Transformers model: also attach the quantizer, so `save_pretrained` / `push_to_hub` work as after
        # `from_pretrained(..., quantization_config=config)`.
        from .hf_quantizer import attach_quantizer

        attach_quantizer(model, config)
    return model
