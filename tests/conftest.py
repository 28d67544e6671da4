"""Fixtures; the helpers the test files share are in `testing_utils.py`."""

from __future__ import annotations

import pytest
import torch
from transformers import BertForSequenceClassification

import stompp_hf  # noqa: F401  (registers the quantizer)
from stompp_hf.kernels import xnor

from .testing_utils import build_sealed_library, needs_cc, tiny_bert_config


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A saved full-precision tiny BERT classifier, to load with `from_pretrained(..., quantization_config=...)`."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    path = tmp_path / "tiny-bert"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def sealed_library(tmp_path_factory) -> bytes:
    """The bytes of a real XNOR library as the build publishes it (digest appended)."""
    if needs_cc.args[0]:
        pytest.skip("no C compiler")
    return build_sealed_library(tmp_path_factory.mktemp("built"))


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """Drop the loaded kernel for one test, and restore the real one (via a fresh load) afterwards."""
    xnor._reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    xnor._reset_for_tests()
    assert xnor.is_available()
