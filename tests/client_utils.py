"""Helpers for the tests of third-party clients (peft, pipelines, evaluate, export): a tiny WordPiece tokenizer
and a packed tiny BERT classifier saved with it, built here so the tests need no network."""

from __future__ import annotations

import itertools
from pathlib import Path

from transformers import BertTokenizer

from stompp_hf import StoMPPConfig

from .testing_utils import fp_checkpoint, load_stompp, train_to_freeze

#: The tiny BERT's 64 tokens: the special tokens, then two-letter words ("aa", "ab", ...).
WORDS = ["".join(p) for p in itertools.product("abcdefgh", repeat=2)][:59]
LABELS = {0: "negative", 1: "positive"}


def tiny_tokenizer() -> BertTokenizer:
    """A WordPiece tokenizer over the tiny BERT's vocabulary of 64 (ids 0-4 special, then `WORDS`)."""
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    return BertTokenizer(vocab=vocab)


def packed_bert(tmp_path: Path, name: str = "packed") -> Path:
    """A packed 1-bit tiny BERT classifier (W1A1, labels `LABELS`) saved with its tokenizer in `tmp_path / name`."""
    model = load_stompp(
        fp_checkpoint(tmp_path),
        StoMPPConfig(weights="stompp_ste", activations="stompp_ste"),
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    train_to_freeze(model)
    path = tmp_path / name
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def sentences(n: int = 4, seed: int = 0) -> list[str]:
    """`n` short sentences of the tiny vocabulary."""
    return [" ".join(WORDS[(seed + 7 * i + 3 * j) % len(WORDS)] for j in range(5)) for i in range(n)]
