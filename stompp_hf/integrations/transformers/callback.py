"""`StoMPPCallback`: drives StoMPP progression from a Transformers `Trainer` (docs/design.md, "Training with
Trainer")."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ...core.dtensor import is_sharded
from ...progression import ProgressionController
from .hub import wrap_trainer_model_card
from .quantizer import KEEP_LATENT_ATTR

logger = logging.getLogger(__name__)

MASKS_FILE = "stompp_masks.safetensors"
STATE_FILE = "stompp_state.json"


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary name, then rename it to `path`: an interrupted save never leaves a truncated file
    behind (the previous one stays)."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


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
        self.controller: ProgressionController | None = None
        self.step = 0
        self._tb_writer = None
        self._model = None

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
        # Checkpoints written while training keep latent weights (resumable); `save_model` after training packs.
        setattr(model, KEEP_LATENT_ATTR, True)
        self._model = model
        total = self._total_steps(state.max_steps)
        self.controller = ProgressionController(model, total)
        if self.controller.stages_short_of_steps:
            logger.warning(
                f"StoMPP progression has {total} steps for {self.controller.num_stages} stages: several stages "
                "will freeze within one step. Train longer or use `granularity='block'`."
            )
        if state.global_step > 0:
            self._restore(args, state.global_step)

    def _restore(self, args: TrainingArguments, step: int) -> None:
        """Restore the masks of `step`: deterministic replay, checked against the checkpoint's mask file if any."""
        self.controller.restore(step)
        folder = os.path.join(args.output_dir, f"checkpoint-{step}")
        path = os.path.join(folder, MASKS_FILE)
        if os.path.isfile(path):
            saved = load_file(path)
            current = self.controller.mask_state_dict()
            if set(saved) != set(current) or any(not saved[k].equal(current[k].cpu()) for k in saved):
                raise RuntimeError(
                    f"The StoMPP masks in {path} differ from the replayed masks of step {step}: the checkpoint was "
                    "written with another StoMPP config or seed."
                )
        self.step = step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.controller.advance(state.global_step)
        self.step = state.global_step

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ) -> None:
        if self.controller is None or logs is None or "loss" not in logs:
            return
        self._check_finite(state.global_step)
        stats = self.controller.stats()
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
        # Reporting callbacks run before user callbacks, so they never see these keys: write them ourselves.
        if "tensorboard" in (args.report_to or []) and state.is_world_process_zero:
            if self._tb_writer is None:
                from torch.utils.tensorboard import SummaryWriter

                # Same folder as Transformers' TensorBoardCallback when TENSORBOARD_LOGGING_DIR is set.
                log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs", "stompp")
                self._tb_writer = SummaryWriter(log_dir=log_dir, filename_suffix=".stompp")
            for key, value in stats.items():
                self._tb_writer.add_scalar(f"train/{key}", value, state.global_step)
            self._tb_writer.flush()

    def _check_finite(self, step: int) -> None:
        """Stop with a clear error once a latent weight is NaN / Inf (a diverged loss), checked at logging steps.

        Trainer's `logging_nan_inf_filter` hides NaN losses from the logs, and a NaN latent weight binarizes to -1
        silently, so without this check a diverged run would go on training (and save) a meaningless network.
        """
        for name, module in self.controller.named_modules:
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
        if self._model is not None:
            setattr(self._model, KEEP_LATENT_ATTR, False)
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.controller is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        masks = {k: v.contiguous().cpu() for k, v in self.controller.mask_state_dict().items()}
        _write_atomically(os.path.join(folder, MASKS_FILE), lambda tmp: save_file(masks, tmp))
        state = {
            "step": self.controller.step,
            "total_steps": self.controller.total_steps,
            "num_stages": self.controller.num_stages,
            **self.controller.stats(),
        }

        def dump(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(state, f, indent=2)

        _write_atomically(os.path.join(folder, STATE_FILE), dump)

    def state(self) -> dict:
        return {
            "args": {"progression_steps": self.progression_steps, "progression_fraction": self.progression_fraction},
            "attributes": {"step": self.step},
        }
