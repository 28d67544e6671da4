"""`evaluate.evaluator("text-classification")` on a packed 1-bit model, offline (the packaged GLUE metric): given the
model and its tokenizer it works as it is; given a `pipeline`, evaluate 0.4 reads `transformers.TFPreTrainedModel`,
which Transformers 5 removed, and the README's one-line workaround makes it work."""

from __future__ import annotations

import evaluate
import pytest
import torch
import transformers
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, pipeline

from stompp_hf.metrics import load_glue_metric

from .client_utils import LABELS, packed_bert, sentences, tiny_tokenizer


@pytest.fixture
def task(tmp_path):
    path = packed_bert(tmp_path)
    texts = sentences(8)
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        predicted = model(**tiny_tokenizer()(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    labels = [0, 1, 1, 0, 1, 0, 0, 1]
    expected = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
    return path, Dataset.from_dict({"text": texts, "label": labels}), expected


def _compute(model_or_pipeline, data, **kwargs) -> dict:
    return evaluate.evaluator("text-classification").compute(
        model_or_pipeline=model_or_pipeline,
        data=data,
        metric=load_glue_metric("sst2"),  # a local metric module: `evaluate.load("accuracy")` needs the Hub
        label_mapping={name: i for i, name in LABELS.items()},
        **kwargs,
    )


def test_evaluator_with_the_model_and_its_tokenizer(task):
    path, data, expected = task
    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    assert _compute(model, data, tokenizer=tiny_tokenizer())["accuracy"] == pytest.approx(expected)
    assert _compute(str(path), data)["accuracy"] == pytest.approx(expected)  # a folder works too


def test_evaluator_with_a_pipeline_needs_the_one_line_workaround(task, monkeypatch):
    path, data, expected = task
    classifier = pipeline("text-classification", model=str(path))
    if not hasattr(transformers, "TFPreTrainedModel"):
        with pytest.raises(AttributeError, match="TFPreTrainedModel"):
            _compute(classifier, data)
    # the README's workaround: a class nothing is an instance of, so evaluate takes the pipeline as it is
    monkeypatch.setattr(transformers, "TFPreTrainedModel", type("TFPreTrainedModel", (), {}), raising=False)
    assert _compute(classifier, data)["accuracy"] == pytest.approx(expected)
