"""`python -m stompp_hf summary <dir>`: the size table for a checkpoint that loads, one line on stderr and a non-zero
exit code (no traceback) for one that does not: no or corrupt weights, weights that do not fit the model, an
architecture Transformers does not have, a missing or malformed config.json."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

from stompp_hf import StoMPPConfig, prepare_model

from .testing_utils import tiny_bert_config, train_to_freeze

ERROR = "python -m stompp_hf summary: error: "


def run_summary(folder, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "stompp_hf", "summary", str(folder), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A packed (progression finished) and a latent (stopped half-way) checkpoint of a tiny BERT classifier."""
    root = tmp_path_factory.mktemp("summary_cli")
    for name, train_steps in (("packed", None), ("latent", 2)):
        torch.manual_seed(0)
        model = prepare_model(BertForSequenceClassification(tiny_bert_config()), StoMPPConfig())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # refresh-rate advice for 4 steps
            train_to_freeze(model, total_steps=4, train_steps=train_steps)
            model.save_pretrained(root / name)
    config = json.loads((root / "packed" / "config.json").read_text())
    assert config["quantization_config"]["packed"] is True
    assert json.loads((root / "latent" / "config.json").read_text())["quantization_config"]["packed"] is False
    return root


def copy_of(checkpoints, kind, tmp_path):
    out = tmp_path / kind
    shutil.copytree(checkpoints / kind, out)
    return out


def edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = edit(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "total" not in result.stdout  # no size table


@pytest.mark.parametrize("kind", ["packed", "latent"])
def test_healthy_checkpoint_prints_the_table(checkpoints, kind):
    result = run_summary(checkpoints / kind)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "total" in result.stdout and "BertForSequenceClassification" in result.stdout
    markdown = run_summary(checkpoints / kind, "--markdown")
    assert markdown.returncode == 0 and "| **total** |" in markdown.stdout


def drop_layer_1(tensors):
    return {k: v for k, v in tensors.items() if "layer.1." not in k}


def add_unexpected(tensors):
    return {**tensors, "bert.encoder.layer.0.output.dense.bogus": torch.zeros(3)}


def reshape_classifier(tensors):
    return {**tensors, "classifier.bias": torch.zeros(3)}


@pytest.mark.parametrize(
    "kind,edit,fragments",
    [
        ("latent", drop_layer_1, ["did not load", "missing", "bert.encoder.layer.1."]),
        ("packed", drop_layer_1, ["bert.encoder.layer.1."]),
        ("latent", add_unexpected, ["did not load", "unexpected", "bogus"]),
        ("latent", reshape_classifier, ["classifier.bias"]),
    ],
    ids=["latent-missing", "packed-missing", "latent-unexpected", "latent-mismatched"],
)
def test_weights_that_do_not_load_are_an_error(checkpoints, tmp_path, kind, edit, fragments):
    folder = copy_of(checkpoints, kind, tmp_path)
    edit_tensors(folder, edit)
    assert_one_line_error(run_summary(folder), *fragments)


def test_no_weights_file(checkpoints, tmp_path):
    folder = copy_of(checkpoints, "latent", tmp_path)
    (folder / "model.safetensors").unlink()
    assert_one_line_error(run_summary(folder), "no weights file", str(folder))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file(checkpoints, tmp_path, damage):
    folder = copy_of(checkpoints, "packed", tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file")
    assert_one_line_error(run_summary(folder), "model.safetensors", "corrupt or truncated")


@pytest.mark.parametrize("architecture", ["pipeline", "BertForNothing", "AutoConfig"])
def test_unknown_architecture(checkpoints, tmp_path, architecture):
    folder = copy_of(checkpoints, "latent", tmp_path)
    edit_config(folder, lambda c: c.update(architectures=[architecture]))
    assert_one_line_error(run_summary(folder), f"'{architecture}'", "not a Transformers model class")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_config_json_not_a_json_object(checkpoints, tmp_path, text):
    folder = copy_of(checkpoints, "latent", tmp_path)
    (folder / "config.json").write_text(text)
    assert_one_line_error(run_summary(folder), "config.json")


def test_config_json_missing(checkpoints, tmp_path):
    folder = copy_of(checkpoints, "latent", tmp_path)
    (folder / "config.json").unlink()
    assert_one_line_error(run_summary(folder), "has no config.json")
    assert_one_line_error(run_summary(tmp_path / "does-not-exist"), "has no config.json")
