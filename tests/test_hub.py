"""Hub uploads and model cards, with a local stand-in for the Hub API client (the Hub is not reachable here)."""

from __future__ import annotations

import fnmatch
import json
import types
from pathlib import Path

import pytest
import torch
import transformers.utils.hub as hf_hub_utils
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, Trainer, TrainingArguments

from stompp_hf import ProgressionController, StoMPPCallback, StoMPPConfig, prepare_model
from stompp_hf.integrations.transformers.hub import TAGS, model_card, template_path

from .testing_utils import tiny_bert_config, toy_dataset


class FakeHubApi:
    """Records what would be uploaded: repo creations and, per upload, every file's bytes at upload time."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.uploads: list[dict] = []

    def create_repo(self, repo_id: str, **kwargs):
        self.created.append(repo_id)
        return types.SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def upload_folder(self, *, repo_id: str, folder_path: str, ignore_patterns=None, **kwargs):
        root = Path(folder_path)
        files = {}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns or ()):
                files[rel] = path.read_bytes()
        self.uploads.append({"repo_id": repo_id, "files": files, **kwargs})
        return "https://huggingface.co/fake/commit"


@pytest.fixture
def fake_hub(monkeypatch):
    api = FakeHubApi()
    monkeypatch.setattr(hf_hub_utils, "_hf_api", api)
    return api


def _binarize(model, steps: int = 3):
    """Train `steps` SGD steps on a toy batch with the progression finishing at the last one."""
    controller = ProgressionController(model, steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = toy_dataset(8)
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["labels"])
    model.train()
    for step in range(1, steps + 1):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        controller.advance(step)
    return model.eval()


def _card(files: dict) -> ModelCard:
    return ModelCard(files["README.md"].decode())


def test_template_ships_in_model_cards_folder():
    path = template_path()
    assert path.parent.name == "model_cards" and path.read_text().startswith("---\n{{ card_data }}\n---")


def test_model_push_to_hub_uploads_packed_checkpoint_and_card(tiny_bert_dir, fake_hub):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    _binarize(model)
    model.push_to_hub("me/tiny-binary-bert", metrics={"eval_accuracy": 0.75}, task="text-classification")

    assert fake_hub.created == ["me/tiny-binary-bert"]
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "me/tiny-binary-bert"
    assert sorted(upload["files"]) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads(upload["files"]["config.json"])
    assert config["quantization_config"]["quant_method"] == "stompp"
    assert config["quantization_config"]["packed"] is True

    card = _card(upload["files"])
    assert set(TAGS) <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-classification"
    text = card.text
    assert "packed 1-bit checkpoint" in text
    assert "XNOR-popcount kernel" in text  # how the packed model runs fast on CPU
    assert "import stompp_hf" in text and 'from_pretrained("me/tiny-binary-bert")' in text
    assert "AutoModelForSequenceClassification" in text
    assert "| eval_accuracy | 0.7500 |" in text
    assert "| `schedule` | `cubic` |" in text and "| `refresh_rate` | `100` |" in text
    assert "| **total** |" in text and "bert.encoder.layer.0" in text


def test_pushed_files_reload_bit_exact(tiny_bert_dir, fake_hub, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    _binarize(model)
    model.push_to_hub("me/roundtrip")
    local = tmp_path / "download"
    local.mkdir()
    for name, data in fake_hub.uploads[0]["files"].items():
        (local / name).write_bytes(data)
    with safe_open(str(local / "model.safetensors"), "pt") as f:
        assert f.get_tensor("bert.encoder.layer.0.attention.self.query.weight").dtype == torch.uint8
    reloaded = AutoModelForSequenceClassification.from_pretrained(local).eval()
    ids = torch.tensor(toy_dataset(4)["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_card_of_latent_checkpoint_says_so(tiny_bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    card = model_card(model, "me/latent", base_model="sentence-transformers/all-MiniLM-L6-v2", dataset="sst2")
    assert "latent (still training) checkpoint" in card.text
    assert "XNOR" not in card.text
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.datasets == ["sst2"]
    assert "No evaluation results" in card.text
    # The front matter parses back to the same metadata.
    assert ModelCard(str(card)).data.to_dict() == card.data.to_dict()


def test_card_names_surge_training(tiny_bert_dir):
    config = StoMPPConfig(weights="ste", activations="ste", compensation="surge", surge_eta=0.25)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=config)
    assert "trained with SURGE gradient compensation (eta 0.25" in model_card(model, "me/surge").text
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    assert "SURGE" not in model_card(plain, "me/plain").text


def test_prepare_model_gives_transformers_models_save_and_push(tmp_path, fake_hub):
    torch.manual_seed(0)
    model = prepare_model(BertForSequenceClassification(tiny_bert_config()), StoMPPConfig())
    _binarize(model)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["packed"] is True
    model.push_to_hub("me/prepared")
    assert "README.md" in fake_hub.uploads[0]["files"]


def test_trainer_push_to_hub_uploads_stompp_card_with_training_details(tiny_bert_dir, fake_hub, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        hub_model_id="me/trained",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=toy_dataset(32),
        eval_dataset=toy_dataset(16, seed=1),
        callbacks=[StoMPPCallback()],
    )
    trainer.train()
    trainer.push_to_hub()

    (upload,) = fake_hub.uploads
    files = upload["files"]
    # Checkpoint folders are not uploaded; the final model is packed.
    assert not any(name.startswith("checkpoint-") for name in files)
    assert {"README.md", "config.json", "model.safetensors", "training_args.bin"} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"]["packed"] is True
    card = _card(files)
    assert set(TAGS) <= set(card.data.tags) and "generated_from_trainer" in card.data.tags
    assert "packed 1-bit checkpoint" in card.text
    assert "## Training details" in card.text and "learning_rate: 0.001" in card.text
    assert "| eval_loss |" in card.text


def test_trainer_card_untouched_for_other_models(fake_hub, tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    args = TrainingArguments(output_dir=str(tmp_path / "fp"), max_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=toy_dataset(8))
    trainer.train()
    trainer.push_to_hub()
    card = _card(fake_hub.uploads[0]["files"])
    assert "stompp" not in (card.data.tags or []) and "StoMPP" not in card.text
