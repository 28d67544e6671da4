"""Tiny models built here, so unit tests need no network and run in seconds."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, RobertaConfig

import stompp_hf  # noqa: F401  (registers the quantizer)


def tiny_bert_config(**overrides) -> BertConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_roberta_config() -> RobertaConfig:
    return RobertaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=72,
        num_labels=2,
    )


def tiny_distilbert_config() -> DistilBertConfig:
    return DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, num_labels=2
    )


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A saved full-precision tiny BERT classifier, to load with `from_pretrained(..., quantization_config=...)`."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    path = tmp_path / "tiny-bert"
    model.save_pretrained(path)
    return str(path)


def toy_dataset(n: int = 64, seq_len: int = 8, vocab: int = 64, seed: int = 0) -> Dataset:
    """A learnable toy task: label = whether token 5 appears in the sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, 3] = 5
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
