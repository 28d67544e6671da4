"""Knowledge-distillation losses on tensors (docs/design.md, "Distillation", Eq. 13-16): logit KD with a
temperature, per-layer hidden-state MSE and attention-probability MSE, with padded positions masked out.

Torch only. Every function returns a per-batch mean (a 0-dim float32 tensor) and treats the teacher's tensors as
constants (they are detached). The Transformers side (which outputs to request, the weights, gradient
accumulation, logging) is `stompp_hf.integrations.transformers.distillation`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["attention_mse", "hidden_mse", "layer_map", "logit_kd"]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` over the entries where `mask` (broadcast to `values`) is true; the plain mean without one."""
    if mask is None:
        return values.mean()
    mask = mask.to(device=values.device, dtype=torch.bool).expand_as(values)
    return values.masked_fill(~mask, 0.0).sum() / mask.sum().clamp_min(1)  # no host sync; all padding gives 0


def logit_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    regression: bool | None = None,
) -> torch.Tensor:
    """Logit distillation (Eq. 13), averaged over rows (every dimension but the last).

    Classification: `T^2 * KL(softmax(t / T) || softmax(s / T))`, the KL summed over classes and averaged over
    rows. The `T^2` keeps the gradient's scale independent of `T` (Hinton et al.). Regression (`regression=True`,
    or `None` and a last dimension of 1, which is what Transformers' `num_labels == 1` heads produce): the mean
    squared error of the logits, and `temperature` is not used.

    `mask` (shape `logits.shape[:-1]`, true = keep), for token-level logits, leaves padded rows out of the mean.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t = student_logits.float(), teacher_logits.detach().float()
    if regression is None:
        regression = s.shape[-1] == 1
    if mask is not None and mask.shape != s.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the logits' rows {tuple(s.shape[:-1])}")
    if regression:
        per_row = ((s - t) ** 2).mean(-1)
        return _masked_mean(per_row, mask)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return temperature**2 * _masked_mean(per_row, mask)


def layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Which teacher layer each student layer is matched with (0-based layer indices, Eq. 16).

    Equal counts: by index. Otherwise uniformly, as TinyBERT does: student layer `l` (1-based) takes teacher
    layer `round(l * num_teacher / num_student)`, rounding halves up, so the last layers always match (a 3-layer
    student of a 6-layer teacher reads teacher layers 2, 4, 6).
    """
    if num_student < 1 or num_teacher < 1:
        raise ValueError(f"need at least one layer on each side, got {num_student} and {num_teacher}")
    return [(2 * layer * num_teacher + num_student) // (2 * num_student) - 1 for layer in range(1, num_student + 1)]


def _pairs(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], embeddings: bool):
    """(student tensor, teacher tensor) pairs. With `embeddings`, entry 0 of each side is the embedding output
    (Transformers' `hidden_states`: L + 1 entries) and always matches entry 0; the layers follow `layer_map`."""
    if not student or not teacher:
        raise ValueError(
            "no hidden states / attentions to distill: the model returned none (it must honour "
            "`output_hidden_states` / `output_attentions`; attentions need `attn_implementation='eager'`)"
        )
    offset = 1 if embeddings else 0
    mapping = layer_map(len(student) - offset, len(teacher) - offset)
    pairs = [(student[0], teacher[0])] if embeddings else []
    pairs += [(student[i + offset], teacher[j + offset]) for i, j in enumerate(mapping)]
    for a, b in pairs:
        if a.shape != b.shape:
            raise ValueError(
                f"student tensor {tuple(a.shape)} and teacher tensor {tuple(b.shape)} differ in shape: per-layer "
                "distillation needs equal hidden sizes and head counts (no projection is learned)"
            )
    return pairs


def hidden_mse(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over matched layers of the hidden states' mean squared error (Eq. 14).

    The sequences are Transformers' `hidden_states` (`[batch, seq, hidden]` each; entry 0 is the embedding output,
    matched with the teacher's entry 0; the layers are matched by `layer_map`). `attention_mask` (`[batch, seq]`,
    1 = token, 0 = padding) leaves padded positions out: each layer's MSE is over the real tokens only.
    """
    mask = None if attention_mask is None else attention_mask.to(torch.bool)[..., None]
    terms = [
        _masked_mean((s.float() - t.detach().float()) ** 2, mask)
        for s, t in _pairs(student_hidden, teacher_hidden, True)
    ]
    return torch.stack(terms).mean()


def attention_mse(
    student_attentions: Sequence[torch.Tensor],
    teacher_attentions: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over matched layers of the attention maps' mean squared error (Eq. 15).

    The sequences are Transformers' `attentions` (`[batch, heads, query, key]` per layer, matched by `layer_map`):
    with `output_attentions=True` these are the attention *probabilities*, after the softmax (and after the padding
    mask was added to the scores), not the raw scores TinyBERT distills. `attention_mask` (`[batch, seq]`) keeps
    the entries whose query and key are both real tokens.
    """
    mask = None
    if attention_mask is not None:
        m = attention_mask.to(torch.bool)
        mask = m[:, None, :, None] & m[:, None, None, :]
    terms = [
        _masked_mean((s.float() - t.detach().float()) ** 2, mask)
        for s, t in _pairs(student_attentions, teacher_attentions, False)
    ]
    return torch.stack(terms).mean()
