"""`ProgressionController`: advances every mask of a converted model, one optimizer step at a time.

Masks are a deterministic function of (config, step): every draw comes from a generator seeded with
(seed, stage, step, tensor index), so distributed ranks agree without communication, and `restore(step)` rebuilds
the exact masks of any step by replaying only the draws of the stage(s) transitioning at that step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import StoMPPConfig
from .conversion import stompp_modules
from .core.masks import make_generator
from .core.schedules import get_schedule, stage_progress
from .nn import Binarizer, StoMPPMixin


@dataclass
class _Tensor:
    index: int
    stage: int
    module: StoMPPMixin
    binarizer: Binarizer


def find_config(model: nn.Module) -> StoMPPConfig:
    """The `StoMPPConfig` of a converted model (`prepare_model` or `from_pretrained(quantization_config=...)`)."""
    config = getattr(model, "stompp_config", None)
    if config is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict):
        config = StoMPPConfig.from_dict(config)
    if not isinstance(config, StoMPPConfig):
        raise ValueError(
            f"{type(model).__name__} is not a StoMPP model: load it with `quantization_config=StoMPPConfig()` or "
            "convert it with `stompp_hf.prepare_model(model, config)`."
        )
    return config


class ProgressionController:
    """Drives the masks of `model` over `total_steps` optimizer steps (the progression length)."""

    def __init__(self, model: nn.Module, total_steps: int, config: StoMPPConfig | None = None) -> None:
        self.config = config if config is not None else find_config(model)
        modules = stompp_modules(model)
        if not modules:
            raise ValueError(f"{type(model).__name__} has no StoMPP modules; convert it first.")
        self.num_stages = 1 + max(m.stompp_stage for m in modules.values())
        if total_steps < 1:
            raise ValueError(
                f"StoMPP needs at least one training step to progress, but got total_steps={total_steps}."
            )
        self.total_steps = int(total_steps)
        self.schedule = get_schedule(self.config.schedule)
        self.named_modules = list(modules.items())
        self.tensors: list[_Tensor] = []
        for module in modules.values():
            for binarizer in module.binarizers():
                binarizer.controlled = True
                if binarizer.progressive:
                    self.tensors.append(_Tensor(len(self.tensors), module.stompp_stage, module, binarizer))
        self.step = 0
        self._apply(0)

    @property
    def stages_short_of_steps(self) -> bool:
        """True when there are fewer progression steps than stages (a stage then lasts less than one step)."""
        return self.total_steps < self.num_stages

    def stage_progress(self, stage: int, step: int | None = None) -> float:
        step = self.step if step is None else step
        return stage_progress(step, self.total_steps, stage, self.num_stages, self.config.order)

    @property
    def current_stage(self) -> int:
        """The first stage not fully frozen (forward / global), or the last one (reverse); num_stages when done."""
        order = range(self.num_stages) if self.config.order != "reverse" else range(self.num_stages - 1, -1, -1)
        for stage in order:
            if self.stage_progress(stage) < 1.0:
                return stage
        return self.num_stages

    def advance(self, step: int) -> None:
        """Move the masks to optimizer step `step` (normally `self.step + 1`; any other value restores)."""
        if step == self.step + 1:
            self._apply(step)
        elif step != self.step:
            self.restore(step)
        self.step = step

    def restore(self, step: int) -> None:
        """Rebuild the exact masks of `step`, replaying only the draws of the stages transitioning at `step`."""
        self._apply(0)
        for stage in range(self.num_stages):
            tau = self.stage_progress(stage, step)
            if 0.0 < tau < 1.0 and self.config.policy == "stochastic":
                first = next(s for s in range(step + 1) if self.stage_progress(stage, s) > 0.0)
                for s in range(first, step):
                    self._apply(s, stages={stage})
        self._apply(step)
        self.step = step

    def _apply(self, step: int, stages: set[int] | None = None) -> None:
        refresh_rate = self.config.refresh_rate
        for t in self.tensors:
            if stages is not None and t.stage not in stages:
                continue
            mask = t.binarizer.mask
            if mask is None:  # an input whose per-sample shape is not known until the first forward pass
                continue
            tau = self.stage_progress(t.stage, step)
            if tau <= 0.0:
                mask.fill(False)
            elif tau >= 1.0:
                mask.fill(True)
            else:
                p = self.schedule(tau)
                device = self._device(t)
                if self.config.policy == "deterministic":
                    weight = t.module.weight.detach()
                    mask.set_closest((weight.abs() - t.binarizer.weight_scale(weight)).abs(), p)
                else:
                    gen = make_generator(device, self.config.seed, t.stage, step, t.index)
                    mask.soft_refresh(p, refresh_rate, gen, device)

    @staticmethod
    def _device(t: _Tensor) -> torch.device:
        return t.module.weight.device

    def stats(self) -> dict[str, float]:
        """What the callback logs: the current stage, the frozen fractions of weights and inputs, and SURGE's mean
        lambda over layers (of the last backward) when SURGE is on."""
        weights = [t.binarizer.mask.frozen_fraction for t in self.tensors if t.binarizer.kind == "weight"]
        inputs = [
            t.binarizer.mask.frozen_fraction for t in self.tensors if t.binarizer.kind == "input" and t.binarizer.mask
        ]
        out = {"stompp/stage": float(self.current_stage), "stompp/num_stages": float(self.num_stages)}
        if weights:
            out["stompp/weight_frozen_fraction"] = sum(weights) / len(weights)
        if inputs:
            out["stompp/input_frozen_fraction"] = sum(inputs) / len(inputs)
        lambdas = [float(m.surge_lambda) for _, m in self.named_modules if m.surge_lambda is not None]
        if lambdas:
            out["stompp/surge_lambda"] = sum(lambdas) / len(lambdas)
        return out

    def mask_state_dict(self) -> dict[str, torch.Tensor]:
        """The materialized masks (transitioning tensors only), keyed by tensor index, for checkpoint files."""
        return {
            f"{t.index}.{t.binarizer.kind}": t.binarizer.mask.value
            for t in self.tensors
            if t.binarizer.mask is not None and t.binarizer.mask.is_transitioning
        }


@contextlib.contextmanager
def binarized(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate the fully binarized network (every mask treated as ones) without changing any training state."""
    binarizers = [b for m in stompp_modules(model).values() for b in m.binarizers()]
    if not binarizers:
        raise ValueError(f"{type(model).__name__} has no StoMPP modules to binarize.")
    previous = [b.force_frozen for b in binarizers]
    for b in binarizers:
        b.force_frozen = True
    try:
        yield model
    finally:
        for b, p in zip(binarizers, previous):
            b.force_frozen = p
