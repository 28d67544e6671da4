"""Fault injection: damaged and edited checkpoints, loaders that do not know StoMPP, a Trainer killed at several
points of a checkpoint write then resumed, and a planted or truncated kernel library (docs/reliability.md).

Every failure must be loud (an exception naming what is wrong) or harmless (an exact result); none may load a
network that differs from the one saved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from stompp_hf import ProgressionController, StoMPPConfig
from stompp_hf.assets import minilm_path
from stompp_hf.kernels import build
from stompp_hf.nn import BinaryLinear

from .testing_utils import (
    eval_ids,
    fp_checkpoint,
    kernel_path,
    load_stompp,
    loaded_from,
    logits,
    needs_cc,
    plant,
    run_check,
    train_to_freeze,
)

REPO = Path(__file__).resolve().parent.parent
QUERY = "bert.encoder.layer.0.attention.self.query"


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> Path:
    """A packed tiny BERT classifier, and the logits it was saved with (`expected.pt`)."""
    tmp = tmp_path_factory.mktemp("packed")
    model = load_stompp(fp_checkpoint(tmp), StoMPPConfig())
    train_to_freeze(model)
    model.save_pretrained(tmp / "packed")
    torch.save(logits(model, eval_ids()), tmp / "expected.pt")
    return tmp / "packed"


def edited_copy(src: Path, dst: Path, tensors=None, config=None) -> Path:
    """A copy of checkpoint `src` with `tensors(dict) -> dict` applied to its weights and `config(dict)` to its
    quantization_config (metadata kept)."""
    shutil.copytree(src, dst)
    if tensors is not None:
        path = dst / "model.safetensors"
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        save_file(tensors(load_file(path)), path, metadata=metadata)
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data["quantization_config"])
        (dst / "config.json").write_text(json.dumps(data))
    return dst


def without(tensors: dict, key: str) -> dict:
    return {k: v for k, v in tensors.items() if k != key}


def load(path: Path):
    return AutoModelForSequenceClassification.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------------------------
# 1. loaders that do not know StoMPP fail loudly instead of loading random weights


def test_plain_transformers_pipeline_and_sentence_transformers_refuse_a_packed_checkpoint(tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, quantization_config=StoMPPConfig()
    )
    train_to_freeze(model, vocab=1000)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path)
    code = (
        "import sys\n"
        "from transformers import AutoModel, AutoModelForSequenceClassification, pipeline\n"
        "from sentence_transformers import SentenceTransformer\n"
        "loaders = {\n"
        f"    'auto': lambda: AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}),\n"
        f"    'base': lambda: AutoModel.from_pretrained({str(tmp_path)!r}),\n"
        f"    'pipeline': lambda: pipeline('text-classification', model={str(tmp_path)!r}),\n"
        f"    'sentence_transformers': lambda: SentenceTransformer({str(tmp_path)!r}, device='cpu'),\n"
        "}\n"
        "for name, loader in loaders.items():\n"
        "    try:\n"
        "        loader()\n"
        "        print(name, 'LOADED')\n"
        "    except Exception as e:\n"
        "        print(name, 'REFUSED', type(e).__name__)\n"
        "assert 'stompp_hf' not in sys.modules\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert set(lines) == {"auto", "base", "pipeline", "sentence_transformers"}
    assert all(v.startswith("REFUSED") for v in lines.values()), lines
    # the size mismatch names a binarized layer's packed weight
    assert "MISMATCH" in done.stderr and "attention.self.query.weight" in done.stderr
    # with stompp_hf imported, the same pipeline loads the packed model and computes what was trained
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(tmp_path), device="cpu")
    assert isinstance(classify.model.bert.encoder.layer[0].attention.self.query, BinaryLinear)
    ids = eval_ids(vocab=1000)
    assert torch.equal(logits(classify.model, ids), logits(model, ids))


def test_plain_timm_refuses_a_packed_export(tmp_path):
    import timm

    from stompp_hf import prepare_model
    from stompp_hf.integrations.timm import save_pretrained

    model = timm.create_model("resnet18", num_classes=10, channels=(8, 8, 8, 8))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    prepare_model(model, StoMPPConfig(activation_sites="input"))
    controller = ProgressionController(model, 2)
    model.train()
    for step in (1, 2):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        controller.advance(step)
    save_pretrained(model, tmp_path, model_args={"channels": (8, 8, 8, 8)})
    code = (
        "import timm\n"
        "try:\n"
        "    timm.create_model('resnet18', num_classes=10, channels=(8, 8, 8, 8), pretrained=True,\n"
        f"                      pretrained_cfg_overlay=dict(file={str(tmp_path / 'model.safetensors')!r}))\n"
        "    print('LOADED')\n"
        "except RuntimeError as e:\n"
        "    print('REFUSED', str(e).replace(chr(10), ' '))\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("REFUSED") and "size mismatch for layer1.0.conv1.weight" in done.stdout


# ---------------------------------------------------------------------------------------------------------------
# 2. damaged packed checkpoints: truncation, bit flips, missing / extra / retyped tensors, edited configs


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.99])
def test_truncated_checkpoint_fails_at_load(packed_dir, tmp_path, keep):
    copy = edited_copy(packed_dir, tmp_path / "c")
    path = copy / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))
    with pytest.raises(Exception, match=r"(?i)truncated|corrupt|header|incomplete|deserializ"):
        load(copy)


def test_bit_flip_in_packed_signs_fails_the_checksum(packed_dir, tmp_path):
    def flip(t):
        t[f"{QUERY}.weight"][3, 1] ^= 0x10
        return t

    with pytest.raises(ValueError, match=rf"`{QUERY}\.weight` does not match the checksum"):
        load(edited_copy(packed_dir, tmp_path / "c", tensors=flip))


def test_bit_flip_in_the_header_fails_at_load(packed_dir, tmp_path):
    copy = edited_copy(packed_dir, tmp_path / "c")
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[12] ^= 0x01  # inside the JSON header, right after the 8-byte length
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"(?i)header|corrupt|deserializ|invalid"):
        load(copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: without(t, f"{QUERY}.weight"), rf"no tensor for layer `{QUERY}`"),
        (lambda t: without(t, f"{QUERY}.weight_scale"), rf"missing `{QUERY}\.weight_scale`"),
        (lambda t: {k: v for k, v in t.items() if not k.startswith(QUERY + ".")}, rf"no tensor for layer `{QUERY}`"),
        (lambda t: {**t, f"{QUERY}.weight": t[f"{QUERY}.weight"].view(torch.int8)}, r"dtype I8, expected U8"),
        (lambda t: {**t, f"{QUERY}.weight_scale": t[f"{QUERY}.weight_scale"] * float("nan")}, r"non-finite"),
        (lambda t: {**t, f"{QUERY}.input_scale": -t[f"{QUERY}.input_scale"]}, r"non-positive"),
    ],
    ids=["weight", "scale", "whole-layer", "int8-weight", "nan-scale", "negative-scale"],
)
def test_missing_or_bad_tensor_is_named_at_load(packed_dir, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load(edited_copy(packed_dir, tmp_path / "c", tensors=edit))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q.update(weight_scale="none"), rf"stores `{QUERY}\.weight_scale`.*weight_scale='none'"),
        (lambda q: q.update(activations=None), rf"stores `{QUERY}\.input_scale`.*activations=None"),
        (lambda q: q.update(packed=False), r"holds packed 1-bit tensors .* says `packed: false`"),
    ],
    ids=["weight_scale-none", "bwn", "packed-false"],
)
def test_config_that_disagrees_with_the_tensors_is_refused(packed_dir, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load(edited_copy(packed_dir, tmp_path / "c", config=edit))


def test_extra_tensor_with_a_foreign_name_is_reported_not_used(packed_dir, tmp_path):
    extra = edited_copy(packed_dir, tmp_path / "c", tensors=lambda t: {**t, "bert.extra.weight": torch.ones(2)})
    model, info = AutoModelForSequenceClassification.from_pretrained(str(extra), output_loading_info=True)
    assert "bert.extra.weight" in info["unexpected_keys"]
    assert torch.equal(logits(model, eval_ids()), torch.load(packed_dir.parent / "expected.pt"))


def test_checkpoint_of_the_earlier_layout_still_loads_bit_exact(packed_dir, tmp_path):
    def legacy(t):
        return {(k[: -len("weight")] + "weight_packed" if v.dtype == torch.uint8 else k): v for k, v in t.items()}

    old = edited_copy(packed_dir, tmp_path / "old", tensors=legacy)
    model = load(old)
    assert torch.equal(logits(model, eval_ids()), torch.load(packed_dir.parent / "expected.pt"))
    model.save_pretrained(tmp_path / "resaved")  # a re-save writes the current layout
    with safe_open(tmp_path / "resaved" / "model.safetensors", framework="pt") as f:
        assert f"{QUERY}.weight" in f.keys() and f"{QUERY}.weight_packed" not in f.keys()


def test_corrupt_mask_state_in_a_latent_checkpoint_fails_at_load(tmp_path):
    model = load_stompp(fp_checkpoint(tmp_path), StoMPPConfig(refresh_rate=4))
    train_to_freeze(model, total_steps=8, train_steps=3)
    model.save_pretrained(tmp_path / "latent")
    key = next(k for k in load_file(tmp_path / "latent" / "model.safetensors") if k.endswith("_extra_state"))
    cut = edited_copy(tmp_path / "latent", tmp_path / "cut", tensors=lambda t: {**t, key: t[key][:5]})
    with pytest.raises(ValueError, match="Not a StoMPP mask state"):
        load(cut)


# ---------------------------------------------------------------------------------------------------------------
# 3. a Trainer killed at several points of a checkpoint write, then resumed


def trainer_run(model_dir, out, kill_at, resume=None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "tests.workers.killed_trainer", model_dir, str(out), kill_at]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv + ([resume] if resume else []), capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from transformers import BertForSequenceClassification

    from .testing_utils import tiny_bert_config

    tmp = tmp_path_factory.mktemp("kill")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(tmp / "tiny-bert")
    done = trainer_run(str(tmp / "tiny-bert"), tmp / "full", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    return str(tmp / "tiny-bert"), json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "kill_at, latest_error",
    [
        ("model", r"(?i)deserializ|truncated|corrupt|header"),  # half of model.safetensors
        ("disk_full", r"(?i)deserializ|truncated|corrupt|header"),  # the same, the writer got ENOSPC
        ("optimizer", r"trainer_state\.json"),  # weights complete, the rest missing
        ("trainer_state", r"(?i)json|expecting|delimiter"),  # half of trainer_state.json
        ("after_save", None),  # complete: resuming the latest checkpoint is exact
    ],
)
def test_killed_during_checkpoint_write_resumes_exactly_or_fails_loudly(
    uninterrupted, tmp_path, kill_at, latest_error
):
    model_dir, expected = uninterrupted
    out = tmp_path / "run"
    killed = trainer_run(model_dir, out, kill_at)
    if kill_at == "disk_full":
        assert killed.returncode == 1 and "No space left on device" in killed.stderr, killed.stderr[-3000:]
    else:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    latest = trainer_run(model_dir, out, "none", "latest")
    if latest_error is None:
        assert latest.returncode == 0, latest.stderr[-3000:]
        assert json.loads(latest.stdout.strip().splitlines()[-1]) == expected
    else:
        assert latest.returncode != 0
        assert re.search(latest_error, latest.stderr), latest.stderr[-3000:]
        # the previous checkpoint is intact and resumes exactly
        previous = trainer_run(model_dir, out, "none", str(out / "checkpoint-2"))
        assert previous.returncode == 0, previous.stderr[-3000:]
        assert json.loads(previous.stdout.strip().splitlines()[-1]) == expected


# ---------------------------------------------------------------------------------------------------------------
# 4. a planted and a truncated kernel library in the cache


@needs_cc
def test_planted_library_never_runs(tmp_path, monkeypatch):
    cache = tmp_path / "kernels"
    monkeypatch.setenv("STOMPP_HF_KERNEL_CACHE", str(cache))
    path = build.library_path("xnor", build.read_source("xnor.c"), build._resolved_compiler())
    marker = tmp_path / "constructor-ran"
    plant(path, tmp_path, marker)
    assert loaded_from(run_check(cache, tmp_path)) == path
    assert not marker.exists(), "the planted library's constructor ran in the loading process"
    assert build._library_problem(path) is None  # replaced by a real build


@needs_cc
def test_truncated_library_is_rebuilt_not_mapped(tmp_path, sealed_library):
    cache = tmp_path / "kernels"
    cache.mkdir(mode=0o700)
    path = kernel_path(cache)
    path.write_bytes(sealed_library[: len(sealed_library) // 2])
    os.chmod(path, 0o700)
    proc = run_check(cache, tmp_path)
    assert proc.returncode != -signal.SIGBUS, "loading the truncated library died with SIGBUS"
    assert loaded_from(proc) == path
    assert build._library_problem(path) is None and path.stat().st_size == len(sealed_library)


# ---------------------------------------------------------------------------------------------------------------
# 5. nothing a checkpoint holds is executed


def test_the_package_never_unpickles_evaluates_or_shells_out():
    """Checkpoints are safetensors + JSON; no code path unpickles, evaluates strings or runs a shell."""
    import ast

    banned = {"torch.load", "pickle.load", "pickle.loads", "marshal.loads", "eval", "exec", "os.system", "os.popen"}
    found = []
    for path in (REPO / "stompp_hf").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                found += [f"{path.name}: import {n}" for n in names if n in ("pickle", "marshal", "dill")]
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name in banned:
                found.append(f"{path.name}:{node.lineno} {name}")
            if any(
                k.arg == "shell" and not (isinstance(k.value, ast.Constant) and not k.value.value)
                for k in node.keywords
            ):
                found.append(f"{path.name}:{node.lineno} {name}(shell=...)")
    assert not found, found
