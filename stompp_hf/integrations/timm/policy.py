"""The timm model policy: the paper's precision policy, stage order and activation handling for CNNs
(docs/design.md, "Vision").

`prepare_model(timm.create_model(...))` converts any timm model through `TimmPolicy` (registered by
`stompp_hf.integrations`); `prepare_vision_model` also takes `act_layer`. Everything is read from the model, not
from hard-coded layer names:

* **Full precision**: the first convolution (`pretrained_cfg["first_conv"]`), the classifier
  (`pretrained_cfg["classifier"]`) and the downsampling / projection convolutions, found by tracing one forward
  pass: a layer that consumes a tensor some earlier layer already consumed starts a *shortcut branch* (a ResNet's
  `downsample`, Bi-Real Net's pooled projection), and every convolution on that branch stays full precision.
* **Stages**: the model's own `group_matcher(coarse=False)` (one residual block per stage, in forward order).
* **Activations**: a binarized convolution fed by a ReLU-family activation would binarize a non-negative
  tensor (sign(relu(x)) = +1 everywhere). The activation that produces each binarized layer's input (seen through
  pooling and identity layers) is replaced by `act_layer` (default `nn.Identity`: the binarizer's sign, and its
  clip while continuous, is the nonlinearity, as in XNOR-Net and Bi-Real Net). Binary-weight networks
  (`activations=None`) keep their activations.

Also here: `cifar_stem` (3x3 stride-1 first convolution, no max-pool, for 28-32 px images).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from timm.models._manipulate import group_with_matcher
from torch import nn

from ...config import StoMPPConfig
from ...conversion import ConversionPlan, FilterFn, ModelPolicy, block_keys, prepare_model, select_modules

#: Activation types whose output feeds a binarized layer's input and is replaced by `act_layer`.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.ELU, nn.Mish)
#: Layers seen through when looking for the activation that produces an input.
_PASS_THROUGH = (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _first_conv(model: nn.Module) -> str:
    return _names(model.pretrained_cfg.get("first_conv"))[0]


def example_input(model: nn.Module, size: int | None = None) -> torch.Tensor:
    """A one-image batch for tracing, with the first convolution's input channels, `size` px square (default: the
    model's `pretrained_cfg["input_size"]`, which is what per-sample masks are sized for)."""
    size = size or tuple(model.pretrained_cfg.get("input_size") or (0, 64, 64))[-1]
    first = model.get_submodule(_first_conv(model))
    param = next(model.parameters())
    return torch.zeros(1, first.in_channels, size, size, dtype=param.dtype, device=param.device)


Trace = list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]


def _trace(model: nn.Module, x: torch.Tensor | None = None) -> Trace:
    """(name, module, input, output) of every leaf module call of one forward pass (on `x`, default
    `example_input(model)`), in execution order."""
    x = x if x is not None else example_input(model)
    calls: Trace = []

    def hook(name):
        def record(module, args, output):
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls.append((name, module, args[0], output))  # references keep every tensor alive: `is` is exact

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls


def shortcut_layers(model: nn.Module, calls: Trace | None = None) -> list[str]:
    """Names of the layers on shortcut (downsampling / projection) branches, found by tracing one forward pass.

    Where two or more layers consume the same tensor (a fork), each consumer starts a branch: it and every layer
    consuming a branch output, in execution order. The main path is the branch whose first convolution has the
    largest kernel (3x3 against a 1x1 projection); on a tie, the branch executed first (a ResNet bottleneck's
    `conv1` runs before its `downsample`). Every other branch is a shortcut. Layers returning their input
    (`nn.Identity`, in-place activations) are transparent. `calls`: a trace of `model` to reuse.
    """
    calls = [c for c in (calls if calls is not None else _trace(model)) if c[3] is not c[2]]
    consumers: dict[int, list[int]] = {}
    for index, (_, _, inp, _) in enumerate(calls):
        consumers.setdefault(id(inp), []).append(index)  # `_trace` holds every tensor, so ids are unique

    def branch(start: int) -> list[int]:
        members, frontier = [start], [start]
        while frontier:
            outputs = id(calls[frontier.pop()][3])
            for nxt in consumers.get(outputs, []):
                if nxt not in members:
                    members.append(nxt)
                    frontier.append(nxt)
        return sorted(members)

    def main_path_rank(members: list[int]) -> tuple[int, int]:
        convs = [calls[i][1] for i in members if isinstance(calls[i][1], nn.Conv2d)]
        area = convs[0].kernel_size[0] * convs[0].kernel_size[1] if convs else 0
        return area, -members[0]

    shortcut: set[int] = set()
    for starts in consumers.values():
        if len(starts) < 2:
            continue
        branches = [branch(s) for s in starts]
        main = max(branches, key=main_path_rank)
        for members in branches:
            if members is not main:
                shortcut.update(set(members) - set(main))
    return [calls[i][0] for i in sorted(shortcut)]


def default_modules_to_not_convert(model: nn.Module, calls: Trace | None = None) -> list[str]:
    """The paper's full-precision policy for a timm model: first conv, classifier, shortcut convolutions.

    `calls`: a trace of `model` to reuse.
    """
    cfg = model.pretrained_cfg
    keep = set(_names(cfg.get("first_conv"))) | set(_names(cfg.get("classifier")))
    modules = dict(model.named_modules())
    keep.update(n for n in shortcut_layers(model, calls) if isinstance(modules[n], (nn.Conv2d, nn.Linear)))
    # Anchored, escaped patterns: a bare "conv1" would also match every block's "layer1.0.conv1" by suffix.
    return [f"^{re.escape(n)}$" for n in sorted(keep) if n in modules]


def stage_keys(model: nn.Module, names: list[str]) -> list[str]:
    """One stage per group of `model.group_matcher(coarse=False)` (a residual block), in forward order."""
    groups = group_with_matcher(((n, n) for n in names), model.group_matcher(coarse=False))
    key_of = {name: str(key) for key, members in groups.items() for name in members}
    return [key_of[n] for n in names]


def _input_producers(calls: Trace, targets: set[str]) -> dict[str, str | None]:
    """For each layer in `targets`: the activation whose output is its input (seen through pooling, dropout and
    identity layers: ResNet's stem ReLU feeds the first block through the max-pool), or None."""
    producers: dict[str, str | None] = {}
    for index, (name, _, inp, _) in enumerate(calls):
        if name not in targets or name in producers:
            continue
        producers[name] = None
        wanted = inp
        for prev_name, prev, prev_in, prev_out in reversed(calls[:index]):
            if prev_out is not wanted:
                continue
            if isinstance(prev, ACTIVATIONS):
                producers[name] = prev_name
                break
            if isinstance(prev, _PASS_THROUGH):
                wanted = prev_in
                continue
            break
    return producers


def inject_activations(
    model: nn.Module,
    binarized: list[str],
    act_layer: Callable[[], nn.Module] = nn.Identity,
    calls: Trace | None = None,
) -> list[str]:
    """Replace each activation whose output is a binarized layer's input by `act_layer()`; return their names.

    `calls`: a trace of `model` to reuse.
    """
    calls = calls if calls is not None else _trace(model)
    producers = _input_producers(calls, set(binarized))
    replaced = list(dict.fromkeys(p for p in producers.values() if p is not None))
    for name in replaced:
        model.set_submodule(name, act_layer())
    return replaced


def activation_sites(model: nn.Module, calls: Trace | None = None) -> dict[str, tuple[int, ...]]:
    """The activations of the paper's BNN: every activation function executed between the first convolution and
    the classifier (those after the residual additions and the stem's included), with the per-sample shape of their
    outputs, in execution order. `calls`: a trace of `model` to reuse."""
    calls = calls if calls is not None else _trace(model)
    names = [c[0] for c in calls]
    first = _names(model.pretrained_cfg.get("first_conv"))
    classifier = set(_names(model.pretrained_cfg.get("classifier")))
    start = names.index(first[0]) if first and first[0] in names else 0
    end = next((i for i, n in enumerate(names) if n in classifier or n.startswith(tuple(classifier))), len(names))
    return {name: tuple(out.shape[1:]) for name, module, _, out in calls[start:end] if isinstance(module, ACTIVATIONS)}


class TimmPolicy(ModelPolicy):
    """timm CNNs: first conv, classifier and shortcut convolutions full precision (read from `pretrained_cfg` and a
    traced forward); stages per tensor in execution order (`granularity="layer"`) or per residual block
    (`group_matcher`); at activation sites every activation becomes a `StoMPPActivation`, at input sites the
    activations feeding binarized inputs are replaced by `act_layer` (see the module docstring)."""

    name = "timm"
    default_granularity = "layer"

    def __init__(self, act_layer: Callable[[], nn.Module] | None = nn.Identity) -> None:
        self.act_layer = act_layer

    def default_config(self) -> StoMPPConfig:
        return StoMPPConfig(weight_scale="none", activation_scale="none")

    def modules_to_not_convert(self, model: nn.Module) -> list[str]:
        return default_modules_to_not_convert(model)

    def stage_keys(self, model: nn.Module, names: list[str], granularity: str) -> list[str]:
        return stage_keys(model, names) if granularity == "block" else block_keys(model, names, granularity)

    def plan(self, model: nn.Module, config: StoMPPConfig, filter_fn: FilterFn | None) -> ConversionPlan:
        calls = _trace(model)  # one traced forward serves every decision below
        values: dict[str, Any] = {}
        if config.modules_to_not_convert is None:
            values["modules_to_not_convert"] = default_modules_to_not_convert(model, calls)
        if config.granularity is None:
            values["granularity"] = self.default_granularity
        if values:
            config = StoMPPConfig.from_dict({**config.to_dict(), **values})
        selected = [n for n, _ in select_modules(model, config, filter_fn)]
        sites = activation_sites(model, calls)
        if config.activation_sites is None:
            config = StoMPPConfig.from_dict(
                {**config.to_dict(), "activation_sites": self._default_sites(model, calls, selected, sites)}
            )
        input_shapes = {n: tuple(inp.shape[1:]) for n, _, inp, _ in calls if n in set(selected)}
        order = list(dict.fromkeys(c[0] for c in calls))
        plan = ConversionPlan(config, input_shapes=input_shapes, order=order)
        if config.activations is None:
            return plan
        if config.activation_sites == "activation":
            plan.activations = sites
            model.stompp_replaced_activations = list(sites)
        elif self.act_layer is not None:
            model.stompp_replaced_activations = inject_activations(model, selected, self.act_layer, calls)
        return plan

    @staticmethod
    def _default_sites(model: nn.Module, calls: Trace, selected: list[str], sites: dict) -> str:
        """'activation' when the model is a vanilla CNN for it (every binarized layer reads an activation site), else
        'input' (MobileNetV2's linear bottlenecks feed the next block unactivated; Bi-Real Net says so itself)."""
        declared = getattr(model, "stompp_activation_sites", None)
        if declared is not None:
            return declared
        producers = _input_producers(calls, set(selected))
        return "activation" if sites and all(p in sites for p in producers.values()) else "input"


def prepare_vision_model(
    model: nn.Module,
    config: StoMPPConfig | None = None,
    filter_fn: FilterFn | None = None,
    act_layer: Callable[[], nn.Module] | None = nn.Identity,
) -> nn.Module:
    """`prepare_model` for timm CNNs (see the module docstring); `act_layer=None` keeps every activation."""
    policy = TimmPolicy(act_layer)
    return prepare_model(model, config, filter_fn, policy=policy)


def cifar_stem(model: nn.Module) -> nn.Module:
    """Adapt a timm model to 28-32 px images in place: a 3x3 stride-1 first conv and no stem max-pool.

    The first conv (`pretrained_cfg["first_conv"]`) keeps its channels; a max-pool executed between it and the
    next convolution (the stem pool) becomes `nn.Identity`. `pretrained_cfg["input_size"]` becomes 32x32, and
    `model.stompp_cifar_stem` is set (saved by `save_pretrained` next to `pretrained_cfg`, which keeps timm's
    fields only, so timm's own loaders can read it). Returns the model.
    """
    name = _first_conv(model)
    old = model.get_submodule(name)
    new = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    calls = _trace(model)
    model.set_submodule(name, new)
    after_stem = [c for c in calls if c[0] != name]
    for pool_name, module, _, _ in after_stem:
        if isinstance(module, nn.Conv2d):
            break  # the stem ends at the next convolution
        if isinstance(module, nn.MaxPool2d):
            model.set_submodule(pool_name, nn.Identity())
            break
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (old.in_channels, 32, 32)}
    model.stompp_cifar_stem = True
    return model
