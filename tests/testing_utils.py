"""Helpers shared by the test files and the distributed workers (`tests/workers/`): tiny models and data built
here, so unit tests need no network and run in seconds. Fixtures and pytest hooks live in `conftest.py`."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    RobertaConfig,
    Trainer,
    TrainingArguments,
)

from stompp_hf import ProgressionController, StoMPPCallback, StoMPPConfig, StoMPPConv2d, StoMPPLinear
from stompp_hf.core.packing import unpack_signs
from stompp_hf.kernels import build, xnor

# ---------------------------------------------------------------------------------------------------------------
# tiny encoders and a toy task


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


def toy_dataset(n: int = 64, seq_len: int = 8, vocab: int = 64, seed: int = 0) -> Dataset:
    """A learnable toy task: label = whether token 5 appears in the sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, 3] = 5
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


# ---------------------------------------------------------------------------------------------------------------
# StoMPP checkpoints: load, train until every mask is frozen, evaluate


def load_stompp(folder, config: StoMPPConfig, **kwargs):
    return AutoModelForSequenceClassification.from_pretrained(str(folder), quantization_config=config, **kwargs)


def fp_checkpoint(tmp_path, make_config=tiny_bert_config, seed=0):
    """A saved full-precision classifier built from `make_config()`."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(make_config())
    path = tmp_path / "fp"
    model.save_pretrained(path)
    return path


def batches(n, vocab=64, batch=4, seq_len=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randint(5, vocab, (batch, seq_len), generator=g), torch.randint(0, 2, (batch,), generator=g)


def train_to_freeze(model, total_steps=4, train_steps=None, vocab=64, lr=0.05):
    """SGD steps under a ProgressionController; `train_steps < total_steps` stops mid-progression."""
    torch.manual_seed(0)
    ctl = ProgressionController(model, total_steps)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step, (ids, labels) in enumerate(batches(train_steps or total_steps, vocab=vocab), start=1):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ctl.advance(step)
    model.eval()
    return ctl


def eval_ids(vocab=64, seed=123):
    return torch.randint(5, vocab, (3, 8), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    model.eval()
    return model(input_ids=ids).logits


def training_args(output_dir, **kwargs) -> TrainingArguments:
    """`TrainingArguments` for tiny CPU runs: batch 8, lr 1e-3, logging every step, no reporting, seed 0."""
    defaults = dict(
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(str(output_dir), **{**defaults, **kwargs})


def trainer_for(model, output_dir, callbacks=(), **kwargs):
    """A `Trainer` on the toy dataset with a `StoMPPCallback` (and `callbacks`); 6 steps unless `max_steps` given."""
    kwargs.setdefault("max_steps", 6)
    args = training_args(output_dir, **kwargs)
    return Trainer(model=model, args=args, train_dataset=toy_dataset(), callbacks=[StoMPPCallback(), *callbacks])


# ---------------------------------------------------------------------------------------------------------------
# single frozen layers, for every pair of rules

RULES = ["stompp", "stompp_ste", "ste", None]
COMBOS = [(w, a) for w in RULES for a in RULES if (w, a) != (None, None)]
LAYERS = {
    # kind: (layer factory, input shape)
    "linear": (lambda: nn.Linear(13, 6), (5, 13)),
    "conv": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), (2, 3, 7, 7)),
    "conv_reflect_groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"), (2, 4, 5, 6)),
}


def with_zeros(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x[x.abs() < 0.4] = 0.0  # exact zeros: sign(0) = +1 must agree between training and packed modules
    x.view(-1)[0] = -0.0
    assert int((x == 0).sum()) > 0
    return x


def frozen_training_module(kind, weights, activations, scales):
    torch.manual_seed(0)
    make_layer, shape = LAYERS[kind]
    layer = make_layer()
    with torch.no_grad():
        layer.weight.view(-1)[::5] = 0.0
    config = StoMPPConfig(
        weights=weights,
        activations=activations,
        weight_scale="channel" if scales else "none",
        activation_scale="tensor" if scales else "none",
    )
    cls = StoMPPLinear if isinstance(layer, nn.Linear) else StoMPPConv2d
    module = cls.from_module(layer, config)
    for b in module.binarizers():
        b.controlled = True
    module.train()
    with torch.no_grad():
        module(torch.randn(shape, generator=torch.Generator().manual_seed(1)))  # measures beta, sizes input masks
        module(torch.randn(shape, generator=torch.Generator().manual_seed(2)))
    for b in module.binarizers():
        b.mask.fill(True)
    assert module.fully_frozen
    module.eval()
    return module, layer, shape


# ---------------------------------------------------------------------------------------------------------------
# kernel libraries: planted, truncated and real ones, loaded in a subprocess


def reference(x, weight_packed, in_features, out_scale=None, bias=None):
    """The dense formula the XNOR kernel must match bit for bit: `linear(sign(x), sign(W)) * scale + bias`."""
    sx = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    sw = unpack_signs(weight_packed, in_features).to(x.dtype) * 2 - 1
    y = F.linear(sx, sw)
    if out_scale is not None:
        y = y * out_scale
    if bias is not None:
        y = y + bias
    return y


needs_cc = pytest.mark.skipif(
    not build.compiler() or shutil.which(build.compiler()[0]) is None,
    reason=f"no C compiler found ({os.environ.get('CC') or 'cc'})",
)
# A library with the kernel's name and symbol that announces itself when loaded and computes garbage.
PLANTED_C = r"""
#include <stdint.h>
#include <stdio.h>
__attribute__((constructor)) static void planted(void)
{
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
int xnor_linear_f32(const float *x, int64_t M, int64_t ldx, int64_t K, const void *w, int64_t N,
                    const float *scale, const float *bias, float *y, int nthreads, int64_t min_work, int64_t simd)
{
    for (int64_t i = 0; i < M * N; i++) y[i] = 42.0f;
    return 0;
}
"""

# Loads the kernel in a fresh process, compares it with the dense formula, and prints the library it loaded.
CHECK_PY = r"""
import torch
import torch.nn.functional as F
from stompp_hf.core.packing import pack_signs
from stompp_hf.kernels import xnor

gen = torch.Generator().manual_seed(0)
for m in (1, 16):  # the scalar and the AVX2 path
    x = torch.randn(m, 100, generator=gen)
    w = torch.rand(24, 100, generator=gen) < 0.5
    scale, bias = torch.rand(24, generator=gen), torch.randn(24, generator=gen)
    expected = F.linear(torch.where(x >= 0, 1.0, -1.0), w.float() * 2 - 1) * scale + bias
    y = xnor.xnor_linear(x, pack_signs(w), 100, scale, bias)
    assert torch.equal(y, expected), "wrong results"
print(xnor._kernel_path)
"""


def kernel_path(directory: Path) -> Path:
    """Where `load_kernel` looks for the XNOR library in `directory`."""
    return build.library_path("xnor", build.read_source("xnor.c"), build._resolved_compiler(), directory)


def run_check(cache: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "STOMPP_HF_KERNEL_CACHE": str(cache), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    return subprocess.run(
        [sys.executable, "-c", CHECK_PY], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def loaded_from(proc: subprocess.CompletedProcess) -> Path:
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


def build_sealed_library(directory: Path) -> bytes:
    """The bytes of a real XNOR library as the build publishes it (digest appended)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STOMPP_HF_KERNEL_CACHE", str(directory))
        _, path = build.load_kernel("xnor.c", "xnor_linear_f32", xnor._ARGTYPES, ctypes.c_int)
    return path.read_bytes()


def plant(path: Path, tmp_path: Path, marker: Path, seal: bool = False) -> None:
    """Compile the planted library into `path` (with a valid digest if `seal`), after checking that loading it
    does run its constructor."""
    lib = tmp_path / "planted.so"
    cmd = [*build._resolved_compiler(), "-shared", "-fPIC", f'-DMARKER="{marker}"', "-x", "c", "-", "-o", str(lib)]
    subprocess.run(cmd, input=PLANTED_C, text=True, check=True, capture_output=True, timeout=120)
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(lib)!r})"], check=True, timeout=60)
    assert marker.exists()
    marker.unlink()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(lib, path)
    if seal:
        build._seal(str(path))
    os.chmod(path, 0o700)
