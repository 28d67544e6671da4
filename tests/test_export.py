"""Packed 1-bit export: packed modules, bit-exact save -> reload, sizes, errors, Trainer checkpoints."""

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)

from stompp_hf import (
    BinaryConv2d,
    BinaryLinear,
    ProgressionController,
    StoMPPConfig,
    StoMPPLinear,
    set_kernel,
    stompp_modules,
    summary,
)
from stompp_hf.export import pack_module, packed_bits_per_weight
from stompp_hf.kernels import xnor

from .testing_utils import (
    COMBOS,
    LAYERS,
    eval_ids,
    fp_checkpoint,
    frozen_training_module,
    load_stompp,
    logits,
    tiny_bert_config,
    tiny_distilbert_config,
    tiny_roberta_config,
    train_to_freeze,
    trainer_for,
    with_zeros,
)

# ---------------------------------------------------------------------------------------------------------------
# helpers


def safetensors_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def file_tensor_bytes(path) -> int:
    return sum(t.numel() * t.element_size() for t in safetensors_tensors(path).values())


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def assert_packed_checkpoint(folder, trained):
    """config.json says packed, and every binarized layer's `weight` is its uint8 packed signs (no float weight)."""
    assert read_config(folder)["quantization_config"]["packed"] is True
    tensors = safetensors_tensors(folder / "model.safetensors")
    names = list(stompp_modules(trained))
    assert names
    for name, module in stompp_modules(trained).items():
        packed = tensors[f"{name}.weight"]
        k = math.prod(module.weight.shape[1:])
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (module.weight.shape[0], (k + 7) // 8)
        assert f"{name}.weight_packed" not in tensors
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# 1. BinaryLinear / BinaryConv2d equal the frozen training modules


@pytest.mark.parametrize("scales", [True, False], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("weights,activations", COMBOS, ids=[f"W{w}-A{a}" for w, a in COMBOS])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_binary_module_equals_frozen_training_module(kind, weights, activations, scales):
    module, layer, shape = frozen_training_module(kind, weights, activations, scales)
    binary_cls = BinaryLinear if kind == "linear" else BinaryConv2d
    x = with_zeros(shape, seed=3)
    with torch.no_grad():
        expected = module(x)
        fp = (
            layer._conv_forward(x, layer.weight, layer.bias)
            if kind != "linear"
            else nn.functional.linear(x, layer.weight, layer.bias)
        )
        assert not torch.equal(expected, fp)  # the frozen module really is binarized

        packed = binary_cls.from_stompp(module)
        assert type(packed) is binary_cls
        assert torch.equal(packed(x), expected)
        assert packed._unpacked is None  # no float copy is kept without the cache
        assert torch.equal(pack_module("layer", module)(x), expected)

        cached = binary_cls.from_stompp(module, unpack_cache=True)
        assert torch.equal(cached(x), expected)
        assert torch.equal(cached(x), expected)

    params = dict(packed.named_parameters())
    state = packed.state_dict()
    expected_keys = {"bias"}
    if weights is not None:
        k = math.prod(module.weight.shape[1:])
        assert "weight" not in params and packed.weight_packed is packed.weight
        assert set(params) == {"bias"}
        assert state["weight"].dtype == torch.uint8
        assert tuple(state["weight"].shape) == (module.weight.shape[0], (k + 7) // 8)
        assert cached.sign_weight() is cached.sign_weight() is cached._unpacked[1]  # kept resident
        expected_keys.add("weight")
        if scales:
            expected_keys.add("weight_scale")
    else:
        assert torch.equal(params["weight"], module.weight) and packed.weight_packed is None
        expected_keys.add("weight")
    if activations is not None and scales:
        assert state["input_scale"].dtype == torch.float32 and float(state["input_scale"]) > 0
        assert torch.equal(state["input_scale"], module.input_binarizer.scale)
        expected_keys.add("input_scale")
    assert set(state) == expected_keys


# ---------------------------------------------------------------------------------------------------------------
# 2. bit-exact save -> reload of tiny encoders

ENCODERS = {
    "bert": tiny_bert_config,
    "roberta": tiny_roberta_config,
    "distilbert": tiny_distilbert_config,
}
CONFIGS = {
    "stompp": dict(),
    "stompp_ste": dict(weights="stompp_ste", activations="stompp_ste"),
    "bwn": dict(activations=None),
    "bwn_deterministic": dict(activations=None, policy="deterministic"),
}
CASES = [(e, "stompp") for e in ENCODERS] + [("bert", c) for c in CONFIGS if c != "stompp"]


@pytest.mark.parametrize("encoder,rules", CASES, ids=[f"{e}-{c}" for e, c in CASES])
def test_packed_save_reload_is_bit_exact(tmp_path, encoder, rules):
    model = load_stompp(fp_checkpoint(tmp_path, ENCODERS[encoder]), StoMPPConfig(**CONFIGS[rules]))
    train_to_freeze(model)
    assert all(m.fully_frozen for m in stompp_modules(model).values())
    ids = eval_ids()
    expected = logits(model, ids)
    out = tmp_path / "packed"
    model.save_pretrained(out)

    assert_packed_checkpoint(out, model)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert not stompp_modules(reloaded)
    binary = {n for n, m in reloaded.named_modules() if isinstance(m, BinaryLinear)}
    assert binary == set(stompp_modules(model))
    for kernel in ("auto", "reference"):  # "auto" runs the XNOR kernel where both operands are binary
        set_kernel(reloaded, kernel)
        assert torch.equal(logits(reloaded, ids), expected), kernel
    # cast to bf16, the kernels run on bf16 activations (avx512 / AMX) with the bf16 reference path's bits
    reloaded.to(torch.bfloat16)
    bf16 = {}
    binary_inputs = CONFIGS[rules].get("activations", "stompp") is not None  # "xnor" refuses weights-only layers
    bf16_kernel = "avx512" in xnor.paths()  # bf16 activations need the avx512 path ("auto" falls back without it)
    for kernel in ("reference", "auto", *(("xnor", "int8") if binary_inputs else ())):
        set_kernel(reloaded, kernel)
        if kernel == "xnor" and not bf16_kernel:
            with pytest.raises(ValueError, match="avx512"):
                logits(reloaded, ids)
            continue
        bf16[kernel] = logits(reloaded, ids)
        assert bf16[kernel].dtype == torch.bfloat16 and torch.equal(bf16[kernel], bf16["reference"]), kernel


# ---------------------------------------------------------------------------------------------------------------
# 3. the real packaged MiniLM (2 layers) on real sentences


@pytest.mark.slow
def test_minilm_packed_reload_is_bit_exact(tmp_path):
    from stompp_hf.assets import load_rotten_tomatoes, minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train_rows, val_rows = load_rotten_tomatoes(n_train=24, n_validation=8)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, num_hidden_layers=2, quantization_config=StoMPPConfig()
    )
    ctl = ProgressionController(model, 3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(1, 4):
        rows = train_rows[8 * (step - 1) : 8 * step]
        enc = tokenizer(
            [r["sentence"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt"
        )
        loss = model(**enc, labels=torch.tensor([r["label"] for r in rows])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ctl.advance(step)
    assert all(m.fully_frozen for m in stompp_modules(model).values())

    model.eval()
    enc = tokenizer(
        [r["sentence"] for r in val_rows], padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**enc).logits
    out = tmp_path / "minilm-packed"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert_packed_checkpoint(out, model)

    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert sum(isinstance(m, BinaryLinear) for m in reloaded.modules()) == 2 * 6 + 1
    with torch.no_grad():
        for kernel in ["reference"] + (["xnor"] if xnor.is_available() else []):
            set_kernel(reloaded, kernel)
            assert torch.equal(reloaded(**enc).logits, expected), kernel


# ---------------------------------------------------------------------------------------------------------------
# 4. bits per binarized weight


@pytest.mark.parametrize("weight_scale,bound", [("channel", 1.05), ("none", 1.0)])
def test_packed_bits_per_weight(tmp_path, weight_scale, bound):
    def make_config():
        return tiny_bert_config(
            hidden_size=640, num_hidden_layers=1, intermediate_size=640, num_attention_heads=2, vocab_size=32
        )

    model = load_stompp(fp_checkpoint(tmp_path, make_config), StoMPPConfig(weight_scale=weight_scale))
    train_to_freeze(model, total_steps=2, vocab=32)
    model.save_pretrained(tmp_path / "packed")
    tensors = assert_packed_checkpoint(tmp_path / "packed", model)
    n_weights = sum(m.weight.numel() for m in stompp_modules(model).values())
    assert n_weights == 7 * 640 * 640
    nbytes = sum(
        t.numel() * t.element_size()
        for k, t in tensors.items()
        if k.endswith(".weight_scale") or (k.endswith(".weight") and t.dtype == torch.uint8)
    )
    bits = 8 * nbytes / n_weights
    assert bits <= bound
    counts = {n: m.weight.numel() for n, m in stompp_modules(model).items()}
    assert packed_bits_per_weight(tensors, counts) == bits
    if weight_scale == "none":
        assert bits == 1.0
        assert not any(k.endswith(".weight_scale") for k in tensors)
    else:
        assert bits > 1.0


# ---------------------------------------------------------------------------------------------------------------
# 5. export_dtype


def test_export_dtype_float16(tmp_path):
    fp = fp_checkpoint(tmp_path)
    models = {}
    for dtype in ("float16", None):
        model = load_stompp(fp, StoMPPConfig(export_dtype=dtype))
        train_to_freeze(model)
        model.save_pretrained(tmp_path / str(dtype))
        models[dtype] = model
    out16 = tmp_path / "float16"
    assert read_config(out16)["quantization_config"]["export_dtype"] == "float16"
    tensors = assert_packed_checkpoint(out16, models["float16"])
    for key, t in tensors.items():
        if key.endswith(".input_scale"):
            assert t.dtype == torch.float32, key
        elif key.endswith(".weight") and key.rpartition(".")[0] in stompp_modules(models["float16"]):
            assert t.dtype == torch.uint8, key
        elif t.is_floating_point():
            assert t.dtype == torch.float16, key
    assert any(k.endswith(".weight_scale") for k in tensors) and "bert.embeddings.word_embeddings.weight" in tensors
    assert (out16 / "model.safetensors").stat().st_size < (tmp_path / "None" / "model.safetensors").stat().st_size
    assert file_tensor_bytes(out16 / "model.safetensors") == summary(models["float16"], print_fn=None).total.nbytes

    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out16))
    assert reloaded.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    ids = eval_ids()
    expected = logits(models["float16"], ids)
    got = logits(reloaded, ids)
    assert got.dtype == torch.float32
    assert not torch.equal(got, expected)
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# 6. errors and the latent fallback


def test_packed_checkpoint_with_edited_config_names_the_tensor(tmp_path):
    model = load_stompp(fp_checkpoint(tmp_path), StoMPPConfig())
    train_to_freeze(model)
    out = tmp_path / "packed"
    model.save_pretrained(out)
    config = read_config(out)
    config["intermediate_size"] = 48
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"`bert\.encoder\.layer\.0\.intermediate\.dense\.weight`"):
        AutoModelForSequenceClassification.from_pretrained(str(out))


def test_saving_mid_progression_writes_latent_checkpoint(tmp_path, caplog):
    model = load_stompp(fp_checkpoint(tmp_path), StoMPPConfig())
    train_to_freeze(model, total_steps=6, train_steps=2)
    assert not all(m.fully_frozen for m in stompp_modules(model).values())
    out = tmp_path / "latent"
    logger = "stompp_hf.integrations.transformers.quantizer"
    with caplog.at_level(logging.WARNING, logger=logger):
        model.save_pretrained(out)
    warnings = [r for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "latent checkpoint" in warnings[0].getMessage()
    assert read_config(out)["quantization_config"]["packed"] is False
    tensors = safetensors_tensors(out / "model.safetensors")
    assert not any(t.dtype == torch.uint8 for k, t in tensors.items() if not k.endswith("_extra_state"))

    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert set(stompp_modules(reloaded)) == set(stompp_modules(model))
    assert all(isinstance(m, StoMPPLinear) for m in stompp_modules(reloaded).values())
    state = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert float(reloaded.bert.pooler.dense.input_binarizer.scale) > 0


def test_packing_requires_measured_beta_and_frozen_masks(tmp_path):
    module = StoMPPLinear.from_module(nn.Linear(8, 4), StoMPPConfig())
    module.weight_binarizer.mask.fill(True)
    module.input_binarizer.mask.fill(True)
    assert module.fully_frozen
    with pytest.raises(ValueError, match="activation scale beta was never measured"):
        pack_module("layer", module)

    module = StoMPPLinear.from_module(nn.Linear(8, 4), StoMPPConfig())
    module.input_binarizer.scale.fill_(0.5)
    with pytest.raises(ValueError, match="masks are not all frozen"):
        pack_module("layer", module)

    # the same through save_pretrained: every mask frozen, but never run in training mode
    model = load_stompp(fp_checkpoint(tmp_path), StoMPPConfig())
    ProgressionController(model, 1).advance(1)
    assert all(m.fully_frozen for m in stompp_modules(model).values())
    with pytest.raises(ValueError, match="activation scale beta was never measured"):
        model.save_pretrained(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# 7. Trainer: latent checkpoints while training, packed save_model after, resume


def test_trainer_checkpoints_are_latent_and_save_model_is_packed(tmp_path):
    run = tmp_path / "run"
    model = load_stompp(fp_checkpoint(tmp_path), StoMPPConfig())
    trainer = trainer_for(model, run, save_strategy="steps", save_steps=3)
    trainer.train()
    assert all(m.fully_frozen for m in stompp_modules(model).values())

    for step in (3, 6):  # the checkpoint of the last step too is written while training runs
        ckpt = run / f"checkpoint-{step}"
        tensors = safetensors_tensors(ckpt / "model.safetensors")
        assert not any(k.endswith(("weight_scale", "input_scale")) for k in tensors)
        for name in stompp_modules(model):
            assert tensors[f"{name}.weight"].dtype == torch.float32
        assert read_config(ckpt)["quantization_config"]["packed"] is False

    ids = eval_ids()
    expected = logits(model, ids)
    trainer.save_model(str(tmp_path / "final"))
    assert_packed_checkpoint(tmp_path / "final", model)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    assert torch.equal(logits(reloaded, ids), expected)

    # resume from the mid-training latent checkpoint
    resumed = BertForSequenceClassification.from_pretrained(str(run / "checkpoint-3"))
    assert all(isinstance(m, StoMPPLinear) for m in stompp_modules(resumed).values())
    trainer = trainer_for(resumed, run, save_strategy="no")
    trainer.train(resume_from_checkpoint=str(run / "checkpoint-3"))
    assert trainer.state.global_step == 6
    assert all(m.fully_frozen for m in stompp_modules(resumed).values())
    trainer.save_model(str(tmp_path / "resumed"))
    assert_packed_checkpoint(tmp_path / "resumed", resumed)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "resumed"))
    resumed_logits = logits(resumed, ids)
    assert torch.equal(logits(reloaded, ids), resumed_logits)
    torch.testing.assert_close(resumed_logits, expected)  # the resumed run ends where the uninterrupted one did


# ---------------------------------------------------------------------------------------------------------------
# 8. summary


def test_summary_matches_saved_packed_checkpoint(tmp_path):
    model = load_stompp(fp_checkpoint(tmp_path), StoMPPConfig())
    train_to_freeze(model)
    projected = summary(model, print_fn=None)
    out = tmp_path / "packed"
    model.save_pretrained(out)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out))
    actual = summary(reloaded, print_fn=None)

    assert projected.total.nbytes == actual.total.nbytes == file_tensor_bytes(out / "model.safetensors")
    n_binarized = sum(m.weight.numel() for m in stompp_modules(model).values())
    assert projected.total.binarized == actual.total.binarized == n_binarized
    assert projected.total.params == actual.total.params == sum(p.numel() for p in model.parameters())

    result = subprocess.run(
        [sys.executable, "-m", "stompp_hf", "summary", str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout


def test_surge_through_from_pretrained_save_and_reload(tmp_path, caplog):
    """SURGE's auxiliary weights: copied from the loaded latent weights, absent from the packed checkpoint, kept in
    a latent (resumable) checkpoint, and the packed reload matches the trained model bit for bit."""
    config = StoMPPConfig(weights="stompp_ste", activations="stompp_ste", compensation="surge")
    with caplog.at_level(logging.WARNING):
        model = load_stompp(fp_checkpoint(tmp_path), config)
    assert "surge_weight" not in caplog.text  # not reported as newly initialized
    modules = stompp_modules(model)
    assert modules and all(torch.equal(m.surge_weight, m.weight) for m in modules.values())
    train_to_freeze(model, total_steps=4, train_steps=2)
    model.save_pretrained(tmp_path / "latent")
    assert any(k.endswith("surge_weight") for k in safetensors_tensors(tmp_path / "latent" / "model.safetensors"))
    resumed = load_stompp(tmp_path / "latent", config)
    for name, module in stompp_modules(resumed).items():
        assert torch.equal(module.surge_weight, modules[name].surge_weight)
    train_to_freeze(model, total_steps=4)
    model.save_pretrained(tmp_path / "packed")
    tensors = assert_packed_checkpoint(tmp_path / "packed", model)
    assert not any("surge" in k for k in tensors)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "packed"))
    assert torch.equal(logits(reloaded, eval_ids()), logits(model, eval_ids()))
