"""Model cards and labels, checked on the rendered cards: the GLUE recipe names its labels (pipelines print them),
titles its card after the model (not the output folder), loads the real location in the snippet, cites Hub dataset
ids, and fills `pipeline_tag` and `model-index`; so does the card `trainer.create_model_card()` writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from huggingface_hub import ModelCard
from stompp_hf_recipes import glue
from transformers import AutoTokenizer, BertForSequenceClassification, Trainer, TrainingArguments, pipeline

from stompp_hf import ProgressionController, StoMPPCallback, StoMPPConfig
from stompp_hf.assets import ROTTEN_TOMATOES_HUB_ID, minilm_path
from stompp_hf.integrations.transformers.hub import PLACEHOLDER_LOCATION, model_card

from .testing_utils import load_stompp, tiny_bert_config, toy_dataset


def test_label_maps_prefer_the_datasets_class_names():
    plain = DatasetDict({"train": Dataset.from_dict({"sentence": ["a"], "label": [1]})})
    assert glue.label_maps("sst2", plain) == {
        "id2label": {0: "negative", 1: "positive"},
        "label2id": {"negative": 0, "positive": 1},
    }
    named = plain.cast_column("label", ClassLabel(names=["bad", "good"]))
    assert glue.label_maps("sst2", named)["id2label"] == {0: "bad", 1: "good"}
    assert glue.label_maps("mnli", plain)["id2label"] == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert glue.label_maps("stsb", plain) == {}  # regression: no labels


@pytest.mark.slow
def test_glue_recipe_card_and_labels_on_the_stand_in(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    tiny = tmp_path / "tiny"
    BertForSequenceClassification(tiny_bert_config(vocab_size=tokenizer.vocab_size)).save_pretrained(tiny)
    tokenizer.save_pretrained(tiny)
    out = tmp_path / "my-run-folder"
    argv = ["--model_name_or_path", str(tiny), "--task_name", "sst2", "--output_dir", str(out)]
    argv += ["--embedded_train_samples", "32", "--embedded_eval_samples", "16", "--max_seq_length", "32"]
    argv += ["--max_steps", "4", "--per_device_train_batch_size", "8", "--progression_fraction", "1.0"]
    argv += ["--logging_steps", "2", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true"]
    glue.main(argv)

    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["label2id"]["positive"] == 1
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == [ROTTEN_TOMATOES_HUB_ID]  # a Hub id, not the stand-in's internal name
    assert card.data.pipeline_tag == "text-classification"
    title = card.text.split("\n# ", 1)[1].split("\n", 1)[0]
    assert title == "bert StoMPP W1A1 on rotten_tomatoes"
    assert "my-run-folder" not in title
    assert f'AutoModelForSequenceClassification.from_pretrained("{out}")' in card.text
    assert "<repo_id>" not in card.text and PLACEHOLDER_LOCATION not in card.text
    (index,) = card.data.to_dict()["model-index"]
    assert index["name"] == title and index["results"]
    metrics = {m["type"] for r in index["results"] for m in r["metrics"]}
    assert {"accuracy", "binarized_accuracy"} <= metrics
    assert all(r["dataset"]["type"] == ROTTEN_TOMATOES_HUB_ID for r in index["results"])
    labels = {row["label"] for row in pipeline("text-classification", model=str(out))(["a gorgeous film", "dull"])}
    assert labels <= {"negative", "positive"}


def test_trainer_card_has_pipeline_tag_and_model_index(tiny_bert_dir, tmp_path):
    model = load_stompp(tiny_bert_dir, StoMPPConfig())
    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=toy_dataset(16),
        eval_dataset=toy_dataset(8, seed=1),
        callbacks=[StoMPPCallback()],
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    trainer.train()
    trainer.create_model_card(dataset_tags="nyu-mll/glue", dataset="GLUE SST-2")
    card = ModelCard.load(os.path.join(args.output_dir, "README.md"))
    assert card.data.pipeline_tag == "text-classification" and "stompp" in card.data.tags
    (index,) = card.data.to_dict()["model-index"]
    assert index["results"] and index["results"][0]["dataset"] == {"name": "GLUE SST-2", "type": "nyu-mll/glue"}
    assert "accuracy" in {m["type"] for m in index["results"][0]["metrics"]}
    assert f'from_pretrained("{args.output_dir}")' in card.text

    # without a dataset the Hub has no valid result to show: no model-index at all, never an empty one
    trainer.create_model_card()
    card = ModelCard.load(os.path.join(args.output_dir, "README.md"))
    assert "model-index" not in card.data.to_dict() and card.data.pipeline_tag == "text-classification"


def test_card_title_snippet_and_metadata_without_a_location(tiny_bert_dir):
    model = load_stompp(tiny_bert_dir, StoMPPConfig(activations=None))
    ProgressionController(model, 1).advance(1)
    card = model_card(model, base_model="org/tiny-bert", metrics={"eval_accuracy": 0.5})
    assert card.text.split("\n# ", 1)[1].startswith("tiny-bert StoMPP W1A32\n")  # binary weights only
    assert f'from_pretrained("{PLACEHOLDER_LOCATION}")' in card.text
    assert "model-index" not in card.data.to_dict()  # metrics, but no dataset: no partial entry
    hub = model_card(model, "me/bwn", dataset="nyu-mll/glue", dataset_name="GLUE SST-2", metrics={"eval_f1": 0.7})
    assert hub.text.split("\n# ", 1)[1].startswith("bwn\n") and 'from_pretrained("me/bwn")' in hub.text
    (index,) = hub.data.to_dict()["model-index"]
    assert index["results"][0]["metrics"] == [{"type": "f1", "value": 0.7}]
