"""Knowledge distillation from a full-precision teacher through `Trainer` (docs/design.md, "Distillation").

`DistillationConfig` holds the weights and the temperature, `distillation_loss` combines the terms of
`stompp_hf.core.distillation` (Eq. 13-16) with the task loss, and `DistillationTrainer` is a `Trainer` whose
`compute_loss` runs the teacher (eval mode, no grad, optionally in bf16) next to the student.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ...core.distillation import attention_mse, hidden_mse, logit_kd

logger = logging.getLogger(__name__)

__all__ = ["TEACHER_DTYPES", "TERMS", "DistillationConfig", "DistillationTrainer", "distillation_loss"]

#: `DistillationConfig.teacher_dtype` values (None keeps the teacher's own dtype).
TEACHER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: The loss terms, in the order they are logged (as `distill/<term>`).
TERMS = ("task", "logit", "hidden", "attention")


@dataclasses.dataclass
class DistillationConfig:
    """What the student learns from the teacher (Eq. 16): `loss = task_weight * task + logit_weight * logit_kd +
    hidden_weight * hidden_mse + attention_weight * attention_mse`.

    Args:
        temperature: T of the logit KD (Eq. 13); not used for regression heads (`num_labels == 1`).
        task_weight: weight of the student's own loss (from the labels). Ignored for batches without labels.
        logit_weight: weight of the logit KD.
        hidden_weight: weight of the per-layer hidden-state MSE (Eq. 14); > 0 requests `output_hidden_states`.
        attention_weight: weight of the per-layer attention-probability MSE (Eq. 15); > 0 requests
            `output_attentions` and switches student and teacher to eager attention (the only implementation that
            returns the probabilities).
        teacher_dtype: `None` (keep the teacher's dtype), `"bfloat16"`, `"float16"` or `"float32"`: the teacher is
            cast to it once, when the trainer is built.
    """

    temperature: float = 2.0
    task_weight: float = 1.0
    logit_weight: float = 1.0
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    teacher_dtype: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"`temperature` must be a number > 0, but got {self.temperature!r}.")
        for term in TERMS:
            value = self.weight(term)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"`{term}_weight` must be a number >= 0, but got {value!r}.")
        if not any(self.weight(term) > 0 for term in TERMS):
            raise ValueError("At least one of the weights must be > 0.")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"`teacher_dtype` must be one of {(None, *TEACHER_DTYPES)}, but got {self.teacher_dtype!r}."
            )

    def weight(self, term: str) -> float:
        """The weight of `term` (one of `TERMS`)."""
        return getattr(self, f"{term}_weight")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def output_flags(self) -> dict[str, bool]:
        """The extra outputs the terms need, as model keyword arguments."""
        flags = {}
        if self.hidden_weight > 0:
            flags["output_hidden_states"] = True
        if self.attention_weight > 0:
            flags["output_attentions"] = True
        return flags


def _field(outputs: Any, name: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def distillation_loss(
    student_outputs: Any,
    teacher_outputs: Any,
    task_loss: torch.Tensor | None,
    config: DistillationConfig,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted distillation loss of one batch (Eq. 16) and each of its terms, unweighted.

    `student_outputs` / `teacher_outputs` are model outputs (`ModelOutput`, a dict, or any object with `logits`
    and, when their weights are > 0, `hidden_states` / `attentions`). `task_loss` is the student's loss from the
    labels, or `None` (no labels: the task term is left out). `attention_mask` (`[batch, seq]`) masks padded
    positions in the hidden-state and attention terms, and in the logit term for token-level logits
    (`[batch, seq, classes]`).

    Returns `{"loss": total, "task": ..., "logit": ..., "hidden": ..., "attention": ...}`, with a term present when
    it was computed: `task` whenever `task_loss` is given (even at weight 0, so it can be logged), each KD term when
    its weight is > 0. Every term is a mean over this batch.
    """
    terms: dict[str, torch.Tensor] = {}
    if task_loss is not None:
        terms["task"] = task_loss
    if config.logit_weight > 0:
        student_logits, teacher_logits = _field(student_outputs, "logits"), _field(teacher_outputs, "logits")
        mask = None
        if attention_mask is not None and student_logits.shape[:-1] == attention_mask.shape:
            mask = attention_mask.to(torch.bool)  # token-level logits: leave padded positions out
        terms["logit"] = logit_kd(student_logits, teacher_logits, config.temperature, mask=mask)
    if config.hidden_weight > 0:
        terms["hidden"] = hidden_mse(
            _field(student_outputs, "hidden_states") or (),
            _field(teacher_outputs, "hidden_states") or (),
            attention_mask,
        )
    if config.attention_weight > 0:
        terms["attention"] = attention_mse(
            _field(student_outputs, "attentions") or (),
            _field(teacher_outputs, "attentions") or (),
            attention_mask,
        )
    weighted = [config.weight(name) * value for name, value in terms.items() if config.weight(name) > 0]
    if not weighted:
        raise ValueError("Nothing to optimize: the batch has no labels and every distillation weight is 0.")
    total = weighted[0]
    for value in weighted[1:]:
        total = total + value
    return {"loss": total, **terms}


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    """Whether `a` and `b` share a Parameter, or a Parameter's storage (a view of the other's weights)."""

    def storages(module: nn.Module) -> set[int]:
        found = set()
        for p in module.parameters():
            try:
                found.add(p.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError, TypeError):  # e.g. tensor subclasses without one storage
                continue
        return found - {0}  # meta tensors

    if {id(p) for p in a.parameters()} & {id(p) for p in b.parameters()}:
        return True
    return bool(storages(a) & storages(b))


def _use_eager_attention(model: nn.Module) -> None:
    """Attention distillation reads the attention probabilities, which only eager attention returns."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        return
    logger.warning(
        "Attention distillation needs the attention probabilities, which only eager attention returns: switching "
        "%s from %r to 'eager'.",
        type(model).__name__,
        implementation,
    )
    model.set_attn_implementation("eager")


def _without(outputs: Any, names: set[str]) -> Any:
    """`outputs` without the fields in `names` (the extra outputs requested for distillation), so that evaluation
    collects the logits only."""
    if not names or not isinstance(outputs, Mapping):
        return outputs
    kept = {k: v for k, v in outputs.items() if k not in names}
    try:
        return type(outputs)(**kept)
    except TypeError:
        return kept


class DistillationTrainer(Trainer):
    """A `Trainer` that distills a frozen full-precision teacher into the model it trains (docs/design.md,
    "Distillation").

    Args:
        teacher: the teacher, e.g. a fine-tuned full-precision checkpoint, or `copy.deepcopy(model)` taken before
            `prepare_model` (which converts in place and reuses the Parameters: a teacher sharing a Parameter with
            the student raises). It is moved to `args.device`, cast to `distillation.teacher_dtype`, set to
            `requires_grad_(False)`, and runs in eval mode under `torch.no_grad()`. It is never wrapped, prepared
            by accelerate, given to the optimizer or saved: pass it again when resuming. Under DDP every rank
            builds its own trainer and so holds its own copy.
        distillation: a `DistillationConfig`.

    With `teacher=None` or `distillation=None` this is exactly `Trainer`. All other arguments are `Trainer`'s.

    Gradient accumulation: every term, the task loss included, is a mean over its micro-batch; the model gets no
    `num_items_in_batch` (nor does `compute_loss_func`), and `loss_is_scaled_for_ga = False` makes `training_step`
    divide the total by the number of accumulated micro-batches, so accumulating k micro-batches of b gives the
    gradient of one batch of k * b (exactly for sequence-level tasks; a mean of per-micro-batch means when token
    counts differ between micro-batches).

    Logging: each term's mean over the logging interval is added to the Trainer's own `loss` logs as
    `distill/task`, `distill/logit`, `distill/hidden`, `distill/attention` (averaged over ranks), so every reporter
    sees them. Evaluation computes the same objective (`eval_loss` includes the teacher terms).
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        distillation: DistillationConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher: nn.Module | None = None
        self.distillation = distillation
        self._distill_sums: dict[str, torch.Tensor] = {}
        self._distill_batches = 0
        if teacher is None or distillation is None:
            if teacher is not None or distillation is not None:
                logger.warning(
                    "DistillationTrainer got a %s but no %s: training without distillation, as `Trainer`.",
                    "teacher" if teacher is not None else "DistillationConfig",
                    "DistillationConfig" if teacher is not None else "teacher",
                )
            return
        if not isinstance(distillation, DistillationConfig):
            raise TypeError(f"`distillation` must be a DistillationConfig, not {type(distillation).__name__}.")
        if self.args.n_gpu > 1:
            raise ValueError("DistillationTrainer does not support DataParallel (several GPUs, one process): use DDP.")
        self.teacher = self._prepare_teacher(teacher)
        self.loss_is_scaled_for_ga = False  # every term is a per-micro-batch mean: training_step divides by GA

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        if teacher is self.model:
            raise ValueError("The teacher is the student itself: pass a separate (full-precision) model.")
        if _shares_parameters(teacher, self.model):
            raise ValueError(
                "The teacher shares parameters with the student (prepare_model / conversion reuse the Parameters "
                "of the model they convert): pass a copy, e.g. `copy.deepcopy(model)` taken before conversion, or "
                "load the checkpoint again."
            )
        teacher.requires_grad_(False)
        dtype = TEACHER_DTYPES.get(self.distillation.teacher_dtype)
        device_map = getattr(teacher, "hf_device_map", None) or {}
        if len(set(device_map.values())) > 1:  # dispatched over several devices: keep its placement
            if dtype is not None:
                teacher.to(dtype=dtype)
        else:
            teacher.to(device=self.args.device, dtype=dtype)
        teacher.eval()
        if self.distillation.attention_weight > 0:
            _use_eager_attention(self.model)
            _use_eager_attention(teacher)
        return teacher

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if self.teacher is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        flags = self.distillation.output_flags()
        requested = {k for k in flags if not inputs.get(k)}  # outputs the caller did not ask for itself
        student_inputs = {**inputs, **flags}
        if any(inputs.get(name) is not None for name in self.label_names):
            # The Trainer's own task loss (label smoother, compute_loss_func), as a per-micro-batch mean.
            task_loss, outputs = super().compute_loss(model, student_inputs, return_outputs=True)
        else:
            task_loss, outputs = None, model(**student_inputs)
        teacher_inputs = {k: v for k, v in inputs.items() if k not in self.label_names}
        self.teacher.eval()
        with torch.no_grad():
            teacher_outputs = self.teacher(**teacher_inputs, **flags)
        losses = distillation_loss(
            outputs, teacher_outputs, task_loss, self.distillation, attention_mask=inputs.get("attention_mask")
        )
        if model.training:
            self._record(losses)
        if return_outputs:
            fields = {"output_hidden_states": "hidden_states", "output_attentions": "attentions"}
            return losses["loss"], _without(outputs, {fields[k] for k in requested})
        return losses["loss"]

    def _record(self, losses: dict[str, torch.Tensor]) -> None:
        for name in TERMS:
            if name in losses:
                value = losses[name].detach().float()
                self._distill_sums[name] = self._distill_sums[name] + value if name in self._distill_sums else value
        self._distill_batches += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._distill_batches and "loss" in logs:
            names = list(self._distill_sums)
            means = torch.stack([self._distill_sums[n] for n in names]) / self._distill_batches
            means = self.accelerator.gather(means[None]).mean(0)  # every rank logs the mean over ranks
            logs.update({f"distill/{n}": v for n, v in zip(names, means.tolist(), strict=True)})
            self._distill_sums, self._distill_batches = {}, 0
        super().log(logs, start_time)

    def train(self, *args: Any, **kwargs: Any):
        self._distill_sums, self._distill_batches = {}, 0
        return super().train(*args, **kwargs)
