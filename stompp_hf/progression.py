"""`ProgressionController`: advances every mask of a converted model, one optimizer step at a time.

Masks are a deterministic function of (config, step): every draw comes from a generator seeded with
(seed, stage, step, tensor index), so distributed ranks agree without communication, and `restore(step)` rebuilds
the exact masks of any step by replaying only the draws of the stage(s) transitioning at that step.

Also here: BinaryConnect's latent weight clipping (`ProgressionController.clip_latent_weights`), the refresh-rate
rule `suggested_refresh_rate`, and `recalibrate_batchnorm`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import StoMPPConfig
from .conversion import stompp_modules
from .core.dtensor import is_sharded
from .core.functional import clip_inplace_
from .core.masks import TRANSITIONING, make_generator, mask_code
from .core.schedules import get_schedule, stage_progress
from .nn import Binarizer, StoMPPModule
from .nn.binarizer import LoadedMask

#: Fewer expected redraws per entry than this over a stage (`L / r`) and the mask cannot follow p(tau).
MIN_REDRAWS_PER_STAGE = 3


@dataclass
class _Tensor:
    index: int
    stage: int
    module: StoMPPModule
    binarizer: Binarizer
    name: str = ""


def count_stages(model: nn.Module) -> int:
    """The number of stages of a converted model (stages are numbered from 0 in every tensor's `Binarizer.stage`)."""
    return 1 + max(b.stage for m in stompp_modules(model).values() for b in m.binarizers())


def stage_length(total_steps: int, num_stages: int, order: str) -> float:
    """L: the optimizer steps over which one stage transitions (`total_steps / num_stages` for 'forward' and
    'reverse', `total_steps` for 'global')."""
    return float(total_steps) if order == "global" else total_steps / num_stages


def suggested_refresh_rate(stage_steps: int, numel: int) -> int:
    """The refresh rate `r` for a tensor of `numel` entries whose stage transitions over `stage_steps` optimizer
    steps: `max(1, min(numel, floor(stage_steps / 8)))`.

    Each step re-draws `k = floor(n / r)` entries, so an entry is re-drawn about `L / r` times over a stage of `L`
    steps: `r = L / 8` gives each entry ~8 draws, enough for the mask to follow the schedule p(tau), and `r <= n`
    keeps `k >= 1` (a tensor with `n < r` never refreshes: it stays continuous until its stage ends, then freezes
    at once). Recipes size `StoMPPConfig.refresh_rate` with it, e.g.
    `suggested_refresh_rate(total_steps // num_stages, smallest tensor)`.
    """
    return max(1, min(int(numel), int(stage_steps) // 8))


def find_config(model: nn.Module) -> StoMPPConfig:
    """The `StoMPPConfig` of a converted model (`prepare_model` or `from_pretrained(quantization_config=...)`), or
    of the first converted model it wraps."""
    config = None
    for module in model.modules():  # the model itself first, then a wrapped one (e.g. inside a SentenceTransformer)
        config = getattr(module, "stompp_config", None)
        if config is None:
            config = getattr(getattr(module, "config", None), "quantization_config", None)
        if config is not None:
            break
    if isinstance(config, dict):
        config = StoMPPConfig.from_dict(config)
    if not isinstance(config, StoMPPConfig):
        raise ValueError(
            f"{type(model).__name__} is not a StoMPP model: load it with `quantization_config=StoMPPConfig()` or "
            "convert it with `stompp_hf.prepare_model(model, config)`."
        )
    return config


class ProgressionController:
    """Drives the masks of `model` over `total_steps` optimizer steps (the progression length).

    At construction it warns (one `UserWarning`) when a stochastic progressive tensor cannot follow its schedule
    with `config.refresh_rate`: it never refreshes (`n < r`) or its entries are re-drawn fewer than 3 times over its
    stage (`L / r < 3`, `L` the stage's transition length in steps), and suggests `suggested_refresh_rate`'s `r`.
    Input masks not sized until the first forward pass are not checked.
    """

    def __init__(self, model: nn.Module, total_steps: int, config: StoMPPConfig | None = None) -> None:
        self.config = config if config is not None else find_config(model)
        modules = stompp_modules(model)
        if not modules:
            raise ValueError(f"{type(model).__name__} has no StoMPP modules; convert it first.")
        self.num_stages = count_stages(model)
        if total_steps < 1:
            raise ValueError(
                f"StoMPP needs at least one training step to progress, but got total_steps={total_steps}."
            )
        self.total_steps = int(total_steps)
        self.schedule = get_schedule(self.config.schedule)
        self.named_modules = list(modules.items())
        self.tensors: list[_Tensor] = []
        self._binarizers: list[Binarizer] = []
        #: (module, weight binarizer) of every latent weight BinaryConnect clips: rules 'ste' and 'stompp_ste'.
        self._clipped: list[tuple[StoMPPModule, Binarizer]] = []
        for name, module in modules.items():
            for binarizer in module.binarizers():
                binarizer.controlled = True
                self._binarizers.append(binarizer)
                if binarizer.progressive:
                    self.tensors.append(_Tensor(len(self.tensors), binarizer.stage, module, binarizer, name))
                if (
                    binarizer.kind == "weight"
                    and binarizer.rule in ("ste", "stompp_ste")
                    and getattr(module, "weight", None) is not None
                ):
                    self._clipped.append((module, binarizer))
        self.step = 0
        self._apply(0)
        self._record(0)
        self._check_refresh_rate()

    @classmethod
    def resume(cls, model: nn.Module, config: StoMPPConfig | None = None) -> ProgressionController:
        """A controller at the position a latent checkpoint of `model` was saved at (`saved_progress`), with the
        masks replayed from the seed and checked against the ones the checkpoint stored.

        Raises:
            ValueError: when the model carries no saved position, or the replayed masks differ from the stored
                ones (the checkpoint was written with another config).
        """
        saved = saved_progress(model)
        if saved is None:
            raise ValueError(
                "The model carries no saved progression position: it was not loaded from a latent StoMPP "
                "checkpoint written mid-progression (or was saved before any step)."
            )
        step, total = saved
        stored = stored_masks(model)
        controller = cls(model, total, config)
        controller.restore(step)
        differing = differing_masks(model, stored)
        if differing:
            raise ValueError(
                f"The masks replayed for step {step} of {total} differ from the checkpoint's for {len(differing)} "
                f"tensor(s) (first: `{differing[0]}`): the checkpoint was written with another StoMPP config."
            )
        return controller

    def _record(self, step: int) -> None:
        """Stamp every tensor with the progression position its mask is at (saved with the mask)."""
        for binarizer in self._binarizers:
            binarizer.progress = (int(step), self.total_steps)

    @property
    def stage_steps(self) -> float:
        """L: the optimizer steps over which one stage transitions (`stage_length`)."""
        return stage_length(self.total_steps, self.num_stages, self.config.order)

    def _check_refresh_rate(self) -> None:
        """Warn when a stochastic progressive tensor never refreshes (`k = n // r < 1`) or is re-drawn fewer than
        `MIN_REDRAWS_PER_STAGE` times per entry over its stage (`L / r`)."""
        if self.config.policy != "stochastic":
            return
        r = self.config.refresh_rate
        length = self.stage_steps
        flagged = []
        for t in self.tensors:
            if t.binarizer.mask is None:  # an input mask sized at the first forward pass: n unknown
                continue
            n = t.binarizer.mask.numel
            k = n // r
            if k < 1 or length / r < MIN_REDRAWS_PER_STAGE:
                flagged.append((t, n, k))
        if not flagged:
            return
        suggested = min(suggested_refresh_rate(math.floor(length), n) for _, n, _ in flagged)
        listed = "; ".join(
            f"`{t.name}` {t.binarizer.kind} (n={n}, k={k}{', never refreshes' if k < 1 else ''})"
            for t, n, k in flagged[:5]
        )
        more = f" and {len(flagged) - 5} more" if len(flagged) > 5 else ""
        warnings.warn(
            f"StoMPP: with refresh_rate={r} and {length:g} steps per stage, {len(flagged)} progressive tensor(s) "
            f"cannot follow the schedule p(tau) (each step re-draws k = n // r entries, so an entry is re-drawn "
            f"~{length / r:.3g} times per stage; fewer than {MIN_REDRAWS_PER_STAGE}, or k < 1, and the mask "
            f"lags the schedule, then freezes at once when the stage ends): {listed}{more}. Use "
            f"`refresh_rate={suggested}` (r = stage length / 8, at most n: "
            "`stompp_hf.progression.suggested_refresh_rate`), or train longer.",
            UserWarning,
            stacklevel=3,
        )

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
        """Move the masks to optimizer step `step` (normally `self.step + 1`; any other value restores).

        Runs after each optimizer step: it first clips the latent weights that step updated
        (`clip_latent_weights`, under the masks the step was taken with), then moves the masks.
        """
        self.clip_latent_weights()
        if step == self.step + 1:
            self._apply(step)
        elif step != self.step:
            self.restore(step)
        self.step = step
        self._record(step)

    def restore(self, step: int) -> None:
        """Rebuild the exact masks of `step`, replaying only the draws of the stages transitioning at `step`.

        Only the masks are replayed: the latent weights are not clipped (they come from the checkpoint as saved).
        """
        self._apply(0)
        for stage in range(self.num_stages):
            tau = self.stage_progress(stage, step)
            if 0.0 < tau < 1.0 and self.config.policy == "stochastic":
                first = next(s for s in range(step + 1) if self.stage_progress(stage, s) > 0.0)
                for s in range(first, step):
                    self._apply(s, stages={stage})
        self._apply(step)
        self.step = step
        self._record(step)

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

    def clip_latent_weights(self) -> None:
        """BinaryConnect: clamp, in place, the latent weights trained with the straight-through estimator to [-1, 1].

        The weight STE is the identity (`core.functional`), so without this clip a latent weight could drift
        arbitrarily far and its sign would never flip back. Clipped: every weight under 'ste'; under 'stompp_ste'
        the entries whose mask is frozen (all of them once the stage is frozen, only the True entries of a
        transitioning mask, none while continuous). 'stompp' weights are never clipped (frozen entries get no
        gradient, continuous ones follow the identity smooth path), nor is SURGE's `surge_weight`.

        The bound is [-1, 1] in the latent's own units with `weight_scale="channel"` too: pretrained transformer
        weights are |w| ~ 0.05, so there the clip is a no-op. FSDP2 / tensor-parallel `DTensor` weights clamp
        their local shard. Cost: one read of the STE weights per optimizer step (`advance` calls it), which writes
        only blocks with an entry outside the bound where the fused pass applies (`core.functional.clip_inplace_`).
        """
        with torch.no_grad():
            for module, binarizer in self._clipped:
                if binarizer.rule == "ste":
                    mask = True
                else:
                    mask = binarizer.mask.value if binarizer.mask is not None else False
                if mask is False:
                    continue
                weight = module.weight.detach()
                local = weight.to_local() if is_sharded(weight) else weight
                if mask is not True:
                    mask = (_local_shard(mask, weight) if is_sharded(weight) else mask).to(local.device)
                clip_inplace_(local, 1.0, None if mask is True else mask)

    @staticmethod
    def _device(t: _Tensor) -> torch.device:
        return t.module.stompp_device()

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


def saved_progress(model: nn.Module) -> tuple[int, int] | None:
    """`(step, total_steps)` at which the masks of `model` were last moved by a `ProgressionController`, as loaded
    from a latent checkpoint (every tensor stores it with its mask); None when no controller moved them.

    Raises:
        ValueError: when the tensors disagree (a checkpoint assembled from several runs).
    """
    positions = {b.progress for m in stompp_modules(model).values() for b in m.binarizers()}
    positions.discard((-1, -1))
    if len(positions) > 1:
        raise ValueError(f"The masks of this model were saved at different progression positions: {positions}.")
    return positions.pop() if positions else None


def stored_masks(model: nn.Module) -> dict[str, LoadedMask]:
    """`name.kind -> LoadedMask` of every tensor whose mask the last `load_state_dict` read (`Binarizer.loaded`),
    consumed: `loaded` is cleared."""
    stored = {}
    for name, module in stompp_modules(model).items():
        for b in module.binarizers():
            if b.loaded is not None:
                stored[f"{name}.{b.kind}"] = b.loaded
                b.loaded = None
    return stored


def mask_digest(model: nn.Module) -> str:
    """sha256 of every binarized tensor's mask state (names, codes and bits): equal digests, equal masks."""
    h = hashlib.sha256()
    for name, module in stompp_modules(model).items():
        for b in module.binarizers():
            h.update(f"{name}.{b.kind}:".encode())
            if b.mask is None:
                h.update(b"unsized")
            elif b.mask.is_transitioning:
                h.update(b.mask.value.detach().cpu().numpy().tobytes())
            else:
                h.update(b"frozen" if b.mask.value else b"continuous")
    return h.hexdigest()


def differing_masks(model: nn.Module, stored: dict[str, LoadedMask]) -> list[str]:
    """The tensors (`name.kind`) whose current mask is not the `stored_masks` one."""
    return [key for key, saved in stored.items() if not _same_mask(model, key, saved.code, saved.mask)]


def _same_mask(model: nn.Module, key: str, code: int, mask: torch.Tensor | None) -> bool:
    name, _, kind = key.rpartition(".")
    binarizer = next(b for b in model.get_submodule(name).binarizers() if b.kind == kind)
    current = binarizer.mask
    if code != mask_code(current):
        return False
    return code != TRANSITIONING or (mask is not None and bool(torch.equal(current.value.cpu(), mask.cpu())))


def commit(model: nn.Module) -> nn.Module:
    """Freeze every mask of `model` for good: the network `binarized(model)` evaluates, made permanent, so that
    `save_pretrained` packs it. For a model stopped mid-progression (e.g. the best checkpoint of
    `load_best_model_at_end`); latent weights are kept, only their signs count from now on."""
    modules = stompp_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no StoMPP modules to commit.")
    for module in modules.values():
        for b in module.binarizers():
            if b.mask is None:
                raise ValueError("Cannot commit an input mask whose size is not known yet: run one forward first.")
            b.mask.fill(True)
    return model


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


def _local_shard(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The entries of the whole-tensor `mask` that this rank's shard of the `DTensor` `weight` holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    local = mask[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    if tuple(local.shape) != tuple(weight.to_local().shape):
        raise NotImplementedError(
            f"StoMPP cannot locate this rank's shard {tuple(weight.to_local().shape)} of a weight with placements "
            f"{weight.placements} in its mask of shape {tuple(mask.shape)}."
        )
    return local


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _batch_to(batch: Any, device: torch.device) -> Any:
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of `model` from `batches`; return how many
    batches were used.

    Binarizing a CNN changes the statistics of every activation, so BN running stats estimated while the network was
    still (partly) continuous are stale: run this on a few training batches, e.g. under `binarized(model)` for the
    fully binary network, before evaluating or exporting.

    Each BN layer (`nn.modules.batchnorm._BatchNorm` with running stats) gets the exact mean and unbiased variance,
    per channel, of its inputs over all the batches together (pooled in float64, as if the batches were one). The
    batches run under `torch.no_grad()` with the BN layers in training mode (they normalize with batch statistics,
    with `momentum=None` while they run) and every other module in eval mode (dropout off). A batch is a tensor,
    passed positionally, or a dict passed as `**batch` without its `labels`; tensors move to the model's device.

    Nothing else changes: the BN layers' momentum and every module's training mode are restored exactly, StoMPP
    masks are not touched, and the activation scales (`Binarizer.scale`) are saved and restored. A BN layer that no
    batch reached keeps its previous statistics. With no BN layer, nothing runs and 0 is returned.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns or (max_batches is not None and max_batches <= 0):
        return 0
    device = _model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    scales = [
        (b, b.scale.detach().clone()) for b in model.modules() if isinstance(b, Binarizer) and b.scale is not None
    ]
    saved = [
        (bn, bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
        for bn in bns
    ]
    # per BN layer: [count, mean, M2] per channel, combined batch by batch (Chan et al.'s parallel variance)
    stats: dict[nn.Module, list] = {bn: [0, None, None] for bn in bns}

    def accumulate(bn: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        x = x.transpose(0, 1).reshape(x.shape[1], -1)
        n_b = x.shape[1]
        if n_b == 0:
            return
        mean_b = x.mean(dim=1)
        m2_b = (x - mean_b[:, None]).square().sum(dim=1)
        entry = stats[bn]
        n_a = entry[0]
        if n_a == 0:
            entry[:] = [n_b, mean_b, m2_b]
            return
        n = n_a + n_b
        delta = mean_b - entry[1]
        entry[:] = [n, entry[1] + delta * (n_b / n), entry[2] + m2_b + delta.square() * (n_a * n_b / n)]

    hooks = [bn.register_forward_pre_hook(accumulate) for bn in bns]
    used, done = 0, False
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                if isinstance(batch, dict):
                    model(**{k: _batch_to(v, device) for k, v in batch.items() if k != "labels"})
                elif isinstance(batch, torch.Tensor):
                    model(batch.to(device))
                else:
                    raise TypeError(
                        "`recalibrate_batchnorm` takes batches that are tensors (passed positionally) or dicts "
                        f"(passed as keyword arguments), but got {type(batch).__name__}."
                    )
                used += 1
            for bn, _, mean, var, tracked in saved:
                count, pooled_mean, m2 = stats[bn]
                if count == 0:  # no batch reached this layer: keep its previous statistics
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                    bn.num_batches_tracked.copy_(tracked)
                    continue
                bn.running_mean.copy_(pooled_mean.to(bn.running_mean.dtype))
                # unbiased, as BatchNorm's own running variance (a single value has variance 0 here, not NaN)
                bn.running_var.copy_((m2 / max(count - 1, 1)).to(bn.running_var.dtype))
        done = True
    finally:
        for hook in hooks:
            hook.remove()
        for bn, momentum, mean, var, tracked in saved:
            bn.momentum = momentum
            if not done:  # a batch failed: put the previous statistics back
                with torch.no_grad():
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                    bn.num_batches_tracked.copy_(tracked)
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for binarizer, scale in scales:
                binarizer.scale.copy_(scale)
    return used
