"""Evaluation metrics shipped with the package as local `evaluate` modules (loaded by path, never from the Hub).

Usage::

    from stompp_hf.metrics import glue_main_metric, load_glue_metric

    metric = load_glue_metric("mrpc")
    metric.compute(predictions=preds, references=labels)  # {"accuracy": ..., "f1": ...}
    TrainingArguments(..., metric_for_best_model=glue_main_metric("mrpc"), greater_is_better=True)
"""

from __future__ import annotations

import os

import evaluate

from .glue import TASK_METRICS, UnknownGlueTaskError, check_task

__all__ = [
    "GLUE_MAIN_METRIC",
    "GLUE_METRIC_KEYS",
    "GLUE_METRIC_PATH",
    "GLUE_TASKS",
    "UnknownGlueTaskError",
    "glue_main_metric",
    "load_glue_metric",
]

#: Absolute path of the GLUE metric script, for ``evaluate.load(GLUE_METRIC_PATH, task)``.
GLUE_METRIC_PATH: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "glue.py")

#: The accepted config names: the GLUE tasks (``mnli`` also as ``mnli_matched``/``mnli_mismatched``) and ``ax``.
GLUE_TASKS: tuple[str, ...] = tuple(TASK_METRICS)

#: Task -> names of the scores ``compute`` returns for it.
GLUE_METRIC_KEYS: dict[str, list[str]] = {task: list(keys) for task, keys in TASK_METRICS.items()}

#: Task -> the score to select checkpoints by (every GLUE score is higher-is-better). This follows the score
#: GLUE itself puts first for the task: Matthews correlation for CoLA and AX, F1 of the positive class for the
#: paraphrase tasks MRPC and QQP (their classes are imbalanced, so accuracy flatters a majority-class model),
#: Pearson correlation for STS-B, and accuracy for every other task.
GLUE_MAIN_METRIC: dict[str, str] = {
    task: ("f1" if "f1" in keys else keys[0]) for task, keys in GLUE_METRIC_KEYS.items()
}


def glue_main_metric(task: str) -> str:
    """The score name to select best models by for `task` (see `GLUE_MAIN_METRIC`); higher is better.

    With `transformers.Trainer`, pass ``metric_for_best_model=glue_main_metric(task)`` (Trainer prefixes
    ``eval_`` itself) and ``greater_is_better=True``.
    """
    return GLUE_MAIN_METRIC[check_task(task)]


def load_glue_metric(task: str, **kwargs) -> evaluate.EvaluationModule:
    """Load the GLUE metric for `task` from the packaged script; works offline and never queries the Hub.

    `kwargs` go to `evaluate.load` (e.g. ``experiment_id=...`` when several processes evaluate at once,
    ``keep_in_memory=True`` to skip writing Arrow cache files).
    """
    return evaluate.load(GLUE_METRIC_PATH, check_task(task), **kwargs)
