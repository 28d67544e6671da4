"""`StoMPPCallback`: drives StoMPP progression from a Transformers `Trainer` (docs/design.md, "Training with
Trainer").

Progress reaches every tracker (`report_to`: TensorBoard, wandb, MLflow, ...) through the Trainer's own logs:
`Trainer` calls its reporting callbacks before the callbacks a user passes, so values a user callback adds in
`on_log` would reach none of them. `Trainer.log` is therefore wrapped once a `StoMPPCallback` exists
(`wrap_trainer_log`): for a Trainer with a `StoMPPCallback`, the `stompp/*` values join the training logs before any
callback sees them (and before `log_history` records them). Other Trainers are untouched.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ...core.dtensor import is_sharded
from ...kernels.cpu import cpu_model, has_native_bf16
from ...progression import ProgressionController, differing_masks, mask_digest, saved_progress, stored_masks
from .hub import wrap_trainer_model_card
from .quantizer import KEEP_LATENT_ATTR

logger = logging.getLogger(__name__)


class StoMPPCallback(TrainerCallback, ExportableState):
    """Advance the masks of a StoMPP model once per optimizer step and log its progress.

    Args:
        progression_steps: optimizer steps over which all stages progress; the rest of training is fully binary.
            Defaults to `state.max_steps` (binary exactly at the last step).
        progression_fraction: alternatively, the fraction of `state.max_steps` used for progression (0, 1].
    """

    def __init__(self, progression_steps: int | None = None, progression_fraction: float | None = None) -> None:
        if progression_steps is not None and progression_fraction is not None:
            raise ValueError("Pass at most one of `progression_steps` and `progression_fraction`.")
        if progression_steps is not None and (not isinstance(progression_steps, int) or progression_steps < 1):
            raise ValueError(f"`progression_steps` must be an int >= 1, but got {progression_steps!r}.")
        if progression_fraction is not None and not 0.0 < progression_fraction <= 1.0:
            raise ValueError(f"`progression_fraction` must be in (0, 1], but got {progression_fraction!r}.")
        self.progression_steps = progression_steps
        self.progression_fraction = progression_fraction
        # `trainer.push_to_hub()` then writes the StoMPP card (Trainer is loaded anyway when a callback is used)
        wrap_trainer_model_card()
        wrap_trainer_log()
        self.controller: ProgressionController | None = None
        self.step = 0
        self._model = None
        self._models: list[torch.nn.Module] = []

    def _total_steps(self, max_steps: int) -> int:
        if self.progression_steps is not None:
            return self.progression_steps
        if self.progression_fraction is not None:
            return max(1, int(max_steps * self.progression_fraction))
        return max_steps

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if model is None:
            raise ValueError("StoMPPCallback needs the model; it is passed by `Trainer`.")
        model = getattr(model, "module", model)  # unwrap DDP
        if hasattr(model, "model_card_data"):  # a sentence-transformers model: its saved card must load it
            from ..sentence_transformers import use_stompp_model_card

            use_stompp_model_card(model)
        # Checkpoints written while training keep latent weights (resumable); `save_model` after training packs.
        self._models = _save_targets(model)
        for target in self._models:
            setattr(target, KEEP_LATENT_ATTR, True)
        self._model = model
        progress = saved_progress(model)
        loaded = stored_masks(model)  # what `Trainer` read from the resumed checkpoint (consumed here)
        total = self._total_steps(state.max_steps)
        self.controller = ProgressionController(model, total)
        if self.controller.stages_short_of_steps:
            logger.warning(
                f"StoMPP progression has {total} steps for {self.controller.num_stages} stages: several stages "
                "will freeze within one step. Train longer or use `granularity='block'`."
            )
        _check_best_model_settings(args)
        _check_cpu_bf16(args)
        if state.global_step > 0:
            self._restore(state, state.global_step, loaded)
        elif progress is not None and progress[0] > 0:
            logger.warning(
                f"StoMPP: this model was saved at step {progress[0]} of a {progress[1]}-step progression; this "
                "training starts a new progression from step 0 (masks continuous). To continue the saved one, "
                "resume its Trainer checkpoint (`resume_from_checkpoint`) or use "
                "`ProgressionController.resume(model)`."
            )

    def _restore(self, state: TrainerState, step: int, loaded: dict) -> None:
        """Restore the masks of `step` by deterministic replay, and check them and the config against the resumed
        checkpoint's own files: its `trainer_state.json` (the config, progression length and mask digest this
        callback stored) and its weights file (the masks every `Binarizer` saved)."""
        saved = _saved_callback_state(state)
        config = self.controller.config
        if saved is None:
            logger.warning(
                "StoMPP: the resumed checkpoint's trainer_state.json has no StoMPPCallback state (written by an "
                "older stompp_hf, or without this callback): its StoMPP config cannot be checked."
            )
        else:
            differing = _config_differences(saved.get("config", {}), config.to_dict())
            if differing:
                raise ValueError(
                    "Cannot resume: the StoMPP config differs from the checkpoint's in "
                    + "; ".join(f"`{k}`: {a!r} (checkpoint) vs {b!r} (now)" for k, a, b in differing)
                    + ". Resume with the checkpoint's config (its config.json `quantization_config`)."
                )
            if saved.get("total_steps") not in (None, self.controller.total_steps):
                raise ValueError(
                    f"Cannot resume: the checkpoint's StoMPP progression spans {saved['total_steps']} optimizer "
                    f"steps, this run's {self.controller.total_steps} (max_steps={state.max_steps}, "
                    f"progression_steps={self.progression_steps}, progression_fraction={self.progression_fraction})"
                    ": `max_steps` or the callback's progression arguments changed since the checkpoint, so the "
                    "masks would follow another schedule. Resume with the same values."
                )
        self.controller.restore(step)
        if saved is not None and saved.get("masks_sha256") not in (None, mask_digest(self._model)):
            raise RuntimeError(
                f"The StoMPP masks replayed for step {step} differ from those the checkpoint recorded (sha256 in "
                "its trainer_state.json): the model or the mask-drawing code changed since it was written."
            )
        steps = {mask.step for mask in loaded.values()}
        if steps and steps != {step}:
            raise RuntimeError(
                f"The resumed weights hold the StoMPP masks of step(s) {sorted(steps)}, but the Trainer resumes at "
                f"step {step}: the checkpoint's weights and trainer_state.json come from different saves."
            )
        differing = differing_masks(self._model, loaded)
        if differing:
            raise RuntimeError(
                f"The StoMPP masks replayed for step {step} differ from the {len(differing)} stored in the "
                f"checkpoint's weights (first: `{differing[0]}`): the checkpoint was written with another StoMPP "
                "config, seed or model."
            )
        self.step = step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.controller.advance(state.global_step)
        self.step = state.global_step

    def progress(self) -> dict[str, float]:
        """What is logged at every training log: `stompp/stage`, `stompp/num_stages`, the mean frozen fractions of
        all weights and inputs (`stompp/weight_frozen_fraction`, `stompp/input_frozen_fraction`), the frozen
        fraction of the stage now transitioning (`stompp/stage_frozen_fraction`: 0 to 1 within every stage, a
        sawtooth over training) and SURGE's mean lambda (`stompp/surge_lambda`, with SURGE)."""
        values = self.controller.stats()
        stage = stage_frozen_fraction(self.controller)
        if stage is not None:
            values["stompp/stage_frozen_fraction"] = stage
        return values

    def add_progress(self, logs: dict[str, Any], state: TrainerState) -> None:
        """Add `progress()` to a training log (one with a `loss`), after checking the latent weights and
        activation scales are finite; `Trainer.log` calls it before any callback (`wrap_trainer_log`)."""
        if self.controller is None or "loss" not in logs or "stompp/stage" in logs:
            return
        self._check_finite(state.global_step)
        logs.update(self.progress())

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ) -> None:
        # Reached without the progress only when a Trainer subclass's `log` bypasses `Trainer.log`: add it for the
        # callbacks after this one and for `log_history` (the reporting callbacks have run already).
        if logs is None or self.controller is None or "loss" not in logs or "stompp/stage" in logs:
            return
        self.add_progress(logs, state)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({k: v for k, v in logs.items() if k.startswith("stompp/")})

    def _check_finite(self, step: int) -> None:
        """Stop with a clear error once a latent weight or an activation scale is NaN / Inf (a diverged loss, or a
        NaN / Inf input: binarized, it would silently become a sign), checked at logging steps (a scalar per layer).

        Trainer's `logging_nan_inf_filter` hides NaN losses from the logs, and a NaN latent weight binarizes to -1
        silently, so without this check a diverged run would go on training (and save) a meaningless network.
        """
        for name, module in self.controller.named_modules:
            for binarizer in module.binarizers():  # beta, the running mean of |x|: NaN once an input was NaN / Inf
                if binarizer.scale is not None and not bool(torch.isfinite(binarizer.scale)):
                    raise RuntimeError(
                        f"StoMPP: the activation scale of `{name}` is {float(binarizer.scale)} at step {step}: an "
                        "input of this layer had NaN / Inf values (a diverged loss, or bad input data). Resume from "
                        "the last checkpoint with a lower learning rate, gradient clipping, or cleaned inputs."
                    )
            if getattr(module, "weight", None) is None:  # a StoMPP activation has no latent weight
                continue
            weight = module.weight.detach()
            weight = weight.to_local() if is_sharded(weight) else weight  # an FSDP2 shard: check locally
            if not bool(torch.isfinite(weight).all()):
                raise RuntimeError(
                    f"StoMPP: the latent weight of `{name}` has NaN / Inf values at step {step}: the loss diverged. "
                    "Resume from the last checkpoint (masks and schedule replay exactly) with a lower learning rate "
                    "or gradient clipping (`max_grad_norm`)."
                )

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        for target in self._models:
            setattr(target, KEEP_LATENT_ATTR, False)
        self._check_best_model(args, state)
        if self._model is not None:
            stored_masks(self._model)  # masks `load_best_model_at_end` read are no resume to check later

    def _check_best_model(self, args: TrainingArguments, state: TrainerState) -> None:
        """After `load_best_model_at_end` loaded a checkpoint from mid-progression, say that the model is now that
        checkpoint's partly continuous network (with its masks), not a binary one, and how to export one."""
        if not getattr(args, "load_best_model_at_end", False) or not state.best_model_checkpoint:
            return
        match = _STEP_OF_CHECKPOINT.search(os.path.normpath(state.best_model_checkpoint))
        if match is None or self.controller is None or int(match.group(1)) >= self.controller.total_steps:
            return
        best = int(match.group(1))
        warnings.warn(
            f"StoMPP: `load_best_model_at_end` loaded {state.best_model_checkpoint}, written at step {best} of the "
            f"{self.controller.total_steps}-step progression: the model now holds that checkpoint's latent weights "
            "and masks, not a fully binary network, so `save_pretrained` writes a latent checkpoint. To export "
            "the binary network that `binarized` evaluated at that step, call `stompp_hf.progression.commit(model)` "
            "first (freezes every mask); to export the end of training, set `load_best_model_at_end=False`.",
            UserWarning,
            stacklevel=2,
        )

    def state(self) -> dict:
        """What `Trainer` stores in each checkpoint's `trainer_state.json`: the arguments, the step, and what a
        resume checks against (`checkpoint`: the config, the progression length and a digest of the masks)."""
        attributes: dict[str, Any] = {"step": self.step}
        if self.controller is not None:
            attributes["checkpoint"] = {
                "config": self.controller.config.to_dict(),
                "total_steps": self.controller.total_steps,
                "num_stages": self.controller.num_stages,
                "masks_sha256": mask_digest(self._model),
                **self.controller.stats(),
            }
        return {
            "args": {"progression_steps": self.progression_steps, "progression_fraction": self.progression_fraction},
            "attributes": attributes,
        }


def stage_frozen_fraction(controller: ProgressionController) -> float | None:
    """The frozen fraction of the stage now transitioning: of its weights, or of its activation for an activation
    stage; 1.0 once every stage is done, None for a stage with no sized mask."""
    stage = controller.current_stage
    if stage >= controller.num_stages:
        return 1.0
    tensors = [t for t in controller.tensors if t.stage == stage and t.binarizer.mask is not None]
    weights = [t for t in tensors if t.binarizer.kind == "weight"]
    fractions = [t.binarizer.mask.frozen_fraction for t in (weights or tensors)]
    return sum(fractions) / len(fractions) if fractions else None


def wrap_trainer_log() -> None:
    """Make `Trainer.log` put the progress of the Trainer's `StoMPPCallback`s into its logs before calling any
    callback, so the reporting callbacks (`report_to`) get it (idempotent; Trainers without one are untouched)."""
    from transformers import Trainer

    original = Trainer.log
    if getattr(original, "_stompp_wrapped", False):
        return

    @functools.wraps(original)
    def log(self, logs, *args, **kwargs):
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, StoMPPCallback):
                callback.add_progress(logs, self.state)
        return original(self, logs, *args, **kwargs)

    log._stompp_wrapped = True
    Trainer.log = log


#: Config fields a resume does not compare: written by `save_pretrained`, not training options.
_UNCOMPARED = ("packed", "quant_method", "export_dtype")


def _config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """`(field, checkpoint value, current value)` of every training field that differs."""
    keys = sorted((set(saved) | set(current)) - set(_UNCOMPARED))
    return [(k, saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)]


def _saved_callback_state(state: TrainerState) -> dict | None:
    """The `checkpoint` record this callback stored in the resumed checkpoint's `trainer_state.json`."""
    data = (state.stateful_callbacks or {}).get(StoMPPCallback.__name__)
    if isinstance(data, list):
        data = data[0] if data else None
    if not isinstance(data, dict):
        return None
    return data.get("attributes", {}).get("checkpoint")


def _save_targets(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model and every wrapped model whose `save_pretrained` may write a checkpoint (e.g. the `PreTrainedModel`
    inside a SentenceTransformer), so each keeps latent weights while training runs."""
    return [model] + [m for m in model.modules() if m is not model and hasattr(m, "hf_quantizer")]


_STEP_OF_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def _check_cpu_bf16(args: TrainingArguments) -> None:
    """Warn when bf16 runs on a CPU that emulates it (docs/design.md, "bf16 on CPUs without bf16 instructions")."""
    if not (getattr(args, "bf16", False) or getattr(args, "bf16_full_eval", False)):
        return
    device = getattr(args, "device", None)
    if device is None or torch.device(device).type != "cpu" or has_native_bf16() is not False:
        return
    warnings.warn(
        f"StoMPP: bf16 is on, but this CPU ({cpu_model()}) has no bf16 instructions (avx512_bf16, amx_bf16): "
        "PyTorch emulates bf16 through float32 on every op, 24x slower than float32 for a MiniLM training step "
        "on an AVX2-only AMD EPYC. Train in float32 here (`bf16=False`).",
        UserWarning,
        stacklevel=3,
    )


def _check_best_model_settings(args: TrainingArguments) -> None:
    """Warn when `load_best_model_at_end` ranks checkpoints by a metric of the unfinished network."""
    if not getattr(args, "load_best_model_at_end", False):
        return
    metric = args.metric_for_best_model or "loss"
    if "binarized" not in metric:
        warnings.warn(
            f"StoMPP: `load_best_model_at_end` ranks checkpoints by `{metric}`, the metric of the network in "
            "progression (partly continuous), not of the binary network that gets exported. Use a binarized "
            "metric, e.g. `metric_for_best_model='binarized_accuracy'` with the recipes' BinarizedEvalTrainer.",
            UserWarning,
            stacklevel=3,
        )
