"""sentence-transformers end to end on the packaged all-MiniLM-L6-v2 (a sentence-transformers folder, first two
layers): binarize, train with a contrastive loss and `StoMPPCallback`, save packed, reload, `encode` and
`similarity` bit for bit, and a saved card that imports `stompp_hf`."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open

from stompp_hf import StoMPPCallback, StoMPPConfig
from stompp_hf.assets import minilm_path
from stompp_hf.nn import BinaryLinear, StoMPPLinear

sentence_transformers = pytest.importorskip("sentence_transformers")
from sentence_transformers import (  # noqa: E402
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402

from stompp_hf.integrations.sentence_transformers import (  # noqa: E402
    IMPORT_LINE,
    StoMPPSentenceTransformerModelCardData,
)

PAIRS = {
    "anchor": ["a cat sits on the mat", "the dog runs fast", "a car drives by", "rain falls all day"],
    "positive": ["a kitten rests on a rug", "a puppy sprints", "an automobile passes", "it rains the whole day"],
}
SENTENCES = ["a cat sits on the mat", "it rains the whole day", "an automobile passes"]


@pytest.mark.slow
def test_binarize_train_save_packed_reload_encode(tmp_path):
    model = SentenceTransformer(
        minilm_path(),
        device="cpu",
        model_kwargs={"quantization_config": StoMPPConfig(weights="stompp_ste", activations="stompp_ste")},
        config_kwargs={"num_hidden_layers": 2},
    )
    # 2 x 6 encoder linears (the pooler, the last module of a BertModel, stays full precision as its head)
    assert sum(isinstance(m, StoMPPLinear) for m in model.modules()) == 12
    args = SentenceTransformerTrainingArguments(
        str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({k: v * 2 for k, v in PAIRS.items()}),
        loss=MultipleNegativesRankingLoss(model),
        callbacks=[StoMPPCallback()],
    )
    with pytest.warns(UserWarning, match="refresh_rate"):  # 4 steps: too short for the schedule (a test budget)
        trainer.train()
    assert type(model.model_card_data) is StoMPPSentenceTransformerModelCardData  # set by the callback
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["stompp/weight_frozen_fraction"] == 1.0 and logged[-1]["stompp/stage_frozen_fraction"] == 1.0
    model.eval()
    embeddings = model.encode(SENTENCES, convert_to_tensor=True)

    model.save(str(tmp_path / "packed"))
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["quantization_config"]["packed"] is True
    with safe_open(str(tmp_path / "packed" / "model.safetensors"), "pt") as f:
        assert f.get_slice("encoder.layer.0.attention.self.query.weight").get_dtype() == "U8"
    card = (tmp_path / "packed" / "README.md").read_text()
    assert f"```python\n{IMPORT_LINE}\nfrom sentence_transformers import SentenceTransformer" in card
    assert all(f"- {tag}" in card for tag in ("stompp", "binarized", "1-bit", "sentence-transformers"))

    reloaded = SentenceTransformer(str(tmp_path / "packed"), device="cpu")
    assert sum(isinstance(m, BinaryLinear) for m in reloaded.modules()) == 12
    assert not any(isinstance(m, StoMPPLinear) for m in reloaded.modules())
    again = reloaded.encode(SENTENCES, convert_to_tensor=True)
    assert torch.equal(again, embeddings)
    similarity = reloaded.similarity(again, again)
    assert torch.equal(similarity, model.similarity(embeddings, embeddings))
    assert similarity.shape == (3, 3) and torch.allclose(similarity.diagonal(), torch.ones(3))
