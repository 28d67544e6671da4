"""The packaged GLUE metric (stompp_hf/metrics/glue.py), loaded by path through `evaluate`, without network."""

from __future__ import annotations

import math
import os
import socket

import evaluate
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from stompp_hf.metrics import (
    GLUE_METRIC_KEYS,
    GLUE_METRIC_PATH,
    GLUE_TASKS,
    glue_main_metric,
    load_glue_metric,
)

ALL_TASKS = [
    "cola",
    "sst2",
    "mrpc",
    "qqp",
    "stsb",
    "mnli",
    "mnli_matched",
    "mnli_mismatched",
    "qnli",
    "rte",
    "wnli",
    "ax",
]
CLASSIFICATION_TASKS = [t for t in ALL_TASKS if t != "stsb"]
THREE_CLASS_TASKS = {"mnli", "mnli_matched", "mnli_mismatched", "ax"}

# (predictions, references) for two-class tasks: mixed, perfect, inverted, and all-one-class (ties).
BINARY_CASES = {
    "mixed": ([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], [1, 0, 0, 1, 0, 1, 1, 0, 1, 0]),
    "perfect": ([0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 1, 0]),
    "inverted": ([1, 0, 0, 1, 0, 1], [0, 1, 1, 0, 1, 0]),
    "constant": ([1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0]),
}
# Three NLI classes (entailment / neutral / contradiction).
MULTICLASS_CASES = {
    "mixed": ([0, 1, 2, 2, 1, 0, 0, 2, 1], [0, 1, 2, 1, 1, 0, 2, 2, 0]),
    "perfect": ([2, 0, 1, 1, 2, 0], [2, 0, 1, 1, 2, 0]),
    "shifted": ([1, 2, 0, 0, 1, 2], [0, 1, 2, 2, 0, 1]),
    "constant": ([0, 0, 0, 0, 0, 0], [2, 0, 1, 1, 2, 0]),
}
# STS-B similarity scores in [0, 5]: mixed, with tied values, perfect, inverted.
STSB_CASES = {
    "mixed": ([0.2, 1.7, 3.1, 4.4, 2.5, 3.9], [0.0, 2.0, 2.8, 5.0, 2.6, 3.2]),
    "ties": ([1.0, 1.0, 2.5, 2.5, 4.0, 0.5], [1.2, 0.8, 3.0, 2.5, 4.0, 1.0]),
    "perfect": ([0.5, 1.25, 2.0, 3.5, 4.75], [0.5, 1.25, 2.0, 3.5, 4.75]),
    "inverted": ([4.0, 3.0, 2.0, 1.0, 0.0], [0.5, 1.5, 2.5, 3.5, 4.5]),
}

_LOADED: dict[str, evaluate.EvaluationModule] = {}


def metric(task: str) -> evaluate.EvaluationModule:
    """Load each task's module once per session (each compute call starts from an empty buffer)."""
    if task not in _LOADED:
        _LOADED[task] = load_glue_metric(task)
    return _LOADED[task]


def expected_classification(task, predictions, references) -> dict[str, float]:
    """The scores computed by sklearn directly."""
    if task in ("cola", "ax"):
        return {"matthews_correlation": matthews_corrcoef(references, predictions)}
    if task in ("mrpc", "qqp"):
        return {"accuracy": accuracy_score(references, predictions), "f1": f1_score(references, predictions)}
    return {"accuracy": accuracy_score(references, predictions)}


def test_config_names_and_keys():
    assert list(GLUE_TASKS) == ALL_TASKS
    assert set(GLUE_METRIC_KEYS) == set(ALL_TASKS)
    assert GLUE_METRIC_KEYS["stsb"] == ["pearson", "spearmanr"]
    assert GLUE_METRIC_KEYS["cola"] == GLUE_METRIC_KEYS["ax"] == ["matthews_correlation"]
    assert GLUE_METRIC_KEYS["mrpc"] == GLUE_METRIC_KEYS["qqp"] == ["accuracy", "f1"]
    assert os.path.isabs(GLUE_METRIC_PATH) and os.path.isfile(GLUE_METRIC_PATH)
    assert os.path.basename(GLUE_METRIC_PATH) == "glue.py"


def test_main_metric():
    expected = {"cola": "matthews_correlation", "ax": "matthews_correlation", "stsb": "pearson"}
    expected.update({"mrpc": "f1", "qqp": "f1"})
    for task in ALL_TASKS:
        assert glue_main_metric(task) == expected.get(task, "accuracy")
        assert glue_main_metric(task) in GLUE_METRIC_KEYS[task]


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_classification_matches_sklearn(task):
    m = metric(task)
    assert m.features["predictions"].dtype == m.features["references"].dtype == "int64"
    cases = MULTICLASS_CASES if task in THREE_CLASS_TASKS else BINARY_CASES
    for name, (predictions, references) in cases.items():
        result = m.compute(predictions=predictions, references=references)
        assert list(result) == GLUE_METRIC_KEYS[task], name
        assert all(type(v) is float for v in result.values()), name
        # Same library on the same integers: exact equality.
        assert result == expected_classification(task, predictions, references), name


@pytest.mark.parametrize("task", CLASSIFICATION_TASKS)
def test_classification_perfect_inverted_constant(task):
    m = metric(task)
    cases = MULTICLASS_CASES if task in THREE_CLASS_TASKS else BINARY_CASES
    perfect = m.compute(predictions=cases["perfect"][0], references=cases["perfect"][1])
    assert all(v == 1.0 for v in perfect.values())
    constant = m.compute(predictions=cases["constant"][0], references=cases["constant"][1])
    if "matthews_correlation" in constant:
        assert constant["matthews_correlation"] == 0.0  # sklearn's value when a prediction class is constant
    if task not in THREE_CLASS_TASKS:
        inverted = m.compute(predictions=BINARY_CASES["inverted"][0], references=BINARY_CASES["inverted"][1])
        assert inverted == {key: (-1.0 if key == "matthews_correlation" else 0.0) for key in inverted}


def test_stsb_matches_scipy():
    m = metric("stsb")
    assert m.features["predictions"].dtype == m.features["references"].dtype == "float32"
    for name, (predictions, references) in STSB_CASES.items():
        result = m.compute(predictions=predictions, references=references)
        assert list(result) == ["pearson", "spearmanr"], name
        assert all(type(v) is float for v in result.values()), name
        # evaluate stores float32: against scipy on the float32-rounded inputs the match is to float64 rounding ...
        p32 = np.asarray(predictions, dtype=np.float32).astype(np.float64)
        r32 = np.asarray(references, dtype=np.float32).astype(np.float64)
        assert result["pearson"] == pytest.approx(pearsonr(p32, r32)[0], rel=1e-12, abs=1e-12), name
        assert result["spearmanr"] == pytest.approx(spearmanr(p32, r32)[0], rel=1e-12, abs=1e-12), name
        # ... and against the float64 inputs to float32 precision.
        assert result["pearson"] == pytest.approx(pearsonr(predictions, references)[0], rel=1e-6), name
        assert result["spearmanr"] == pytest.approx(spearmanr(predictions, references)[0], rel=1e-6), name
    perfect = m.compute(predictions=STSB_CASES["perfect"][0], references=STSB_CASES["perfect"][1])
    assert perfect == {"pearson": pytest.approx(1.0), "spearmanr": pytest.approx(1.0)}  # to float64 rounding
    inverted = m.compute(predictions=STSB_CASES["inverted"][0], references=STSB_CASES["inverted"][1])
    assert inverted == {"pearson": pytest.approx(-1.0), "spearmanr": pytest.approx(-1.0)}


def test_hand_computed_values():
    # Accuracy 3 of 4.
    assert metric("sst2").compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1]) == {"accuracy": 0.75}
    # Confusion matrix TP=3, FP=1, FN=2, TN=4: accuracy 7/10, precision 3/4, recall 3/5, F1 = 2TP/(2TP+FP+FN) = 2/3,
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 10 / sqrt(600) = 1/sqrt(6).
    predictions = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    references = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    mrpc = metric("mrpc").compute(predictions=predictions, references=references)
    assert mrpc == {"accuracy": pytest.approx(0.7, abs=1e-15), "f1": pytest.approx(2 / 3, abs=1e-15)}
    cola = metric("cola").compute(predictions=predictions, references=references)
    assert cola["matthews_correlation"] == pytest.approx(1 / math.sqrt(6), abs=1e-15)
    # Pearson of x=[1,2,3], y=[1,3,2]: deviations [-1,0,1] and [-1,1,0], covariance 1, variances 2 -> 1/2;
    # the ranks equal the values, so Spearman is 1/2 as well.
    stsb = metric("stsb").compute(predictions=[1.0, 2.0, 3.0], references=[1.0, 3.0, 2.0])
    assert stsb == {"pearson": pytest.approx(0.5, abs=1e-15), "spearmanr": pytest.approx(0.5, abs=1e-15)}


def test_input_types():
    m = metric("mrpc")
    expected = {"accuracy": 0.75, "f1": 0.8}
    as_int32 = np.array([1, 0, 1, 1], dtype=np.int32), np.array([1, 0, 0, 1], dtype=np.int32)
    assert m.compute(predictions=as_int32[0], references=as_int32[1]) == expected
    # Whole-number floats are accepted as class ids; probabilities are refused rather than truncated to 0.
    assert m.compute(predictions=[1.0, 0.0, 1.0, 1.0], references=[1, 0, 0, 1]) == expected
    with pytest.raises(ValueError, match="class ids"):
        m.compute(predictions=[0.7, 0.2, 0.9, 0.6], references=[1, 0, 0, 1])
    # Incremental use, as in an evaluation loop.
    m.add_batch(predictions=[1, 0], references=[1, 0])
    m.add(prediction=1, reference=0)
    m.add(prediction=1, reference=1)
    assert m.compute() == expected
    # STS-B takes a 1-D sequence of scores (squeeze a (n, 1) regression head output first).
    stsb = metric("stsb")
    scores = np.array([[0.2], [1.7], [3.1], [4.4]], dtype=np.float32)
    with pytest.raises(ValueError):
        stsb.compute(predictions=scores, references=[0.0, 2.0, 2.8, 5.0])
    assert stsb.compute(predictions=scores.squeeze(-1), references=[0.0, 2.0, 2.8, 5.0])["spearmanr"] == pytest.approx(
        1.0
    )


@pytest.mark.parametrize("bad", ["mnli-mm", "sts-b", "glue", "SST2"])
def test_unknown_task(bad):
    for exc in (KeyError, ValueError):
        with pytest.raises(exc) as info:
            load_glue_metric(bad)
        assert repr(bad) in str(info.value)
        assert all(task in str(info.value) for task in ALL_TASKS)
        with pytest.raises(exc):
            glue_main_metric(bad)
    # Loading the script directly reports the same error (from the metric's own config check) ...
    with pytest.raises(KeyError, match="stsb"):
        evaluate.load(GLUE_METRIC_PATH, bad)


def test_missing_config_name():
    # ... and so does loading it without a config name (evaluate then uses "default").
    with pytest.raises(ValueError, match="'default'"):
        evaluate.load(GLUE_METRIC_PATH)


@pytest.fixture
def no_network(monkeypatch):
    """Make any connection attempt fail the test."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == []


@pytest.mark.parametrize("offline_env", [True, False], ids=["offline-env", "no-offline-env"])
def test_loads_without_network(monkeypatch, no_network, offline_env):
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
        monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)  # evaluate reads the env at import
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_EVALUATE_OFFLINE", raising=False)
        monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", False)
    m = load_glue_metric("rte")  # a fresh load, not the cached instance
    assert isinstance(m, evaluate.EvaluationModule)
    assert m.name == "glue" and m.config_name == "rte"
    assert m.compute(predictions=[0, 1, 1], references=[0, 1, 0]) == {"accuracy": pytest.approx(2 / 3, abs=1e-15)}
    direct = evaluate.load(GLUE_METRIC_PATH, "stsb")
    assert direct.compute(predictions=[1.0, 2.0, 3.0], references=[2.0, 4.0, 6.0]) == {
        "pearson": pytest.approx(1.0),
        "spearmanr": pytest.approx(1.0),
    }
