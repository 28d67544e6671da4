"""GLUE scores as a local `evaluate` metric module, loaded by path (no Hub access).

Load it with ``stompp_hf.metrics.load_glue_metric(task)`` or ``evaluate.load(GLUE_METRIC_PATH, task)``.
`evaluate` copies this file into its modules cache and imports the copy as a standalone module, so it
must stay self-contained: no relative imports and no imports from `stompp_hf`.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# Task (config name) -> names of the scores its `compute` returns, in order.
TASK_METRICS: dict[str, list[str]] = {
    "cola": ["matthews_correlation"],
    "sst2": ["accuracy"],
    "mrpc": ["accuracy", "f1"],
    "qqp": ["accuracy", "f1"],
    "stsb": ["pearson", "spearmanr"],
    "mnli": ["accuracy"],
    "mnli_matched": ["accuracy"],
    "mnli_mismatched": ["accuracy"],
    "qnli": ["accuracy"],
    "rte": ["accuracy"],
    "wnli": ["accuracy"],
    "ax": ["matthews_correlation"],
}

# The tasks whose labels are real-valued similarity scores rather than class ids.
REGRESSION_TASKS = frozenset({"stsb"})


class UnknownGlueTaskError(KeyError, ValueError):
    """Raised for a config name that is not a GLUE task; catchable as either KeyError or ValueError."""

    def __str__(self) -> str:  # KeyError would otherwise print the message wrapped in quotes
        return str(self.args[0]) if self.args else ""


def check_task(task: str) -> str:
    """Return `task` if it names a GLUE task, else raise `UnknownGlueTaskError` listing the accepted names."""
    if task not in TASK_METRICS:
        raise UnknownGlueTaskError(
            f"Unknown GLUE task {task!r}; pass one of: {', '.join(TASK_METRICS)} as the config name, "
            f"e.g. load_glue_metric('sst2')."
        )
    return task


_DESCRIPTION = """\
Scores for the General Language Understanding Evaluation benchmark (GLUE), one config per task. \
Each task is scored the way the benchmark reports it: CoLA and the AX diagnostic set by the Matthews \
correlation coefficient, MRPC and QQP by accuracy and F1 of the positive class (label 1), STS-B by the \
Pearson and Spearman correlations between predicted and gold similarity scores, and SST-2, MNLI \
(matched and mismatched), QNLI, RTE and WNLI by accuracy. Every score is returned as a Python float.
"""

_CITATION = """\
@inproceedings{wang2019glue,
  title = {{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author = {Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year = {2019},
  note = {arXiv:1804.07461}
}
"""

_INPUTS_DESCRIPTION = """\
Args:
    predictions: one prediction per example. For classification tasks, the predicted class ids
        (integers, e.g. `logits.argmax(-1)`); for `stsb`, the predicted similarity scores (floats, a
        1-D sequence: squeeze a `(n, 1)` regression output first).
    references: the gold labels, in the same form and order as `predictions`.

Returns, depending on the config name:
    cola, ax: {"matthews_correlation"}, in [-1, 1]
    mrpc, qqp: {"accuracy", "f1"}, each in [0, 1]; F1 treats label 1 as the positive class
    stsb: {"pearson", "spearmanr"}, each in [-1, 1] (nan if either side is constant)
    sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli: {"accuracy"}, in [0, 1]

Example:
    >>> from stompp_hf.metrics import load_glue_metric
    >>> metric = load_glue_metric("mrpc")
    >>> metric.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'accuracy': 0.75, 'f1': 0.8}
"""


def _accuracy(predictions, references) -> float:
    return float(accuracy_score(references, predictions))


def _f1(predictions, references) -> float:
    return float(f1_score(references, predictions))


def _matthews(predictions, references) -> float:
    return float(matthews_corrcoef(references, predictions))


def _require_class_ids(name: str, values) -> None:
    """Raise if `values` holds floats that are not whole numbers (e.g. probabilities instead of class ids)."""
    if values is None:
        return
    try:
        array = np.asarray(values)
    except Exception:  # ragged or exotic input: let evaluate's own format check report it
        return
    if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise ValueError(
            f"GLUE classification {name} must be class ids (integers), got non-integral floats; "
            f"take the argmax of the logits first (e.g. `logits.argmax(-1)`)."
        )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS_DESCRIPTION)
class Glue(evaluate.Metric):
    """GLUE task scores; the config name picks the task."""

    def _info(self) -> evaluate.MetricInfo:
        task = check_task(self.config_name)
        value_type = "float32" if task in REGRESSION_TASKS else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(value_type), "references": datasets.Value(value_type)}
            ),
            homepage="https://gluebenchmark.com/",
            reference_urls=["https://arxiv.org/abs/1804.07461"],
            format="numpy",
        )

    # evaluate.EvaluationModule.__init__ appends `inputs_description` to the docstrings of `add_batch` and `add`,
    # so these overrides must have docstrings (a None __doc__ makes it fail with a TypeError).
    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references; classification tasks refuse non-integral floats.

        `compute` goes through here too. The int64 features would silently truncate probabilities or
        scores (0.7 -> 0), hence the check.
        """
        if self.config_name not in REGRESSION_TASKS:
            _require_class_ids("predictions", predictions)
            _require_class_ids("references", references)
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction and reference; classification tasks refuse non-integral floats."""
        if self.config_name not in REGRESSION_TASKS:
            _require_class_ids("prediction", None if prediction is None else [prediction])
            _require_class_ids("reference", None if reference is None else [reference])
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references) -> dict[str, float]:
        task = self.config_name
        if task in REGRESSION_TASKS:
            # Stored as float32; correlate in float64 so the result carries no extra float32 rounding.
            predictions = np.asarray(predictions, dtype=np.float64)
            references = np.asarray(references, dtype=np.float64)
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        if task in ("cola", "ax"):
            return {"matthews_correlation": _matthews(predictions, references)}
        if task in ("mrpc", "qqp"):
            return {"accuracy": _accuracy(predictions, references), "f1": _f1(predictions, references)}
        return {"accuracy": _accuracy(predictions, references)}
