"""LoRA (peft) on binarized models: a packed 1-bit base with full-precision adapters (the QLoRA pattern), trained
with `Trainer`, saved and reloaded as an adapter, merged back into a latent StoMPP model; and LoRA on latent models."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from stompp_hf import StoMPPConfig, stompp_modules
from stompp_hf.export import binarization_progress
from stompp_hf.integrations.peft import load_lora_adapter, merge_lora_into_latent, stompp_lora_config
from stompp_hf.nn import BinaryLinear, StoMPPLinear

from .testing_utils import eval_ids, fp_checkpoint, load_stompp, logits, toy_dataset, train_to_freeze

TARGETS = ["query", "value", "intermediate.dense"]


@pytest.fixture
def packed_dir(tmp_path):
    model = load_stompp(fp_checkpoint(tmp_path), StoMPPConfig(weights="stompp_ste", activations="stompp_ste"))
    train_to_freeze(model)
    model.save_pretrained(tmp_path / "packed")
    return tmp_path / "packed"


def lora_model(packed_dir):
    base = AutoModelForSequenceClassification.from_pretrained(str(packed_dir))
    assert any(isinstance(m, BinaryLinear) for m in base.modules())
    config = stompp_lora_config(
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"], lora_dropout=0.0)
    )
    return get_peft_model(base, config)


def test_lora_on_packed_base_trains_saves_reloads_and_merges(packed_dir, tmp_path):
    model = lora_model(packed_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    packed_before = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint8}
    assert len(packed_before) == 13  # 2 layers x (query, key, value, attention out, intermediate, output) + pooler
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert all(not p.any() for p in lora_b.values())  # LoRA starts as a no-op

    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=toy_dataset())
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert all(model.get_parameter(n).abs().sum() > 0 for n in lora_b)  # the adapters trained
    for n, b in model.named_buffers():  # the 1-bit base did not change
        if n in packed_before:
            assert torch.equal(b, packed_before[n])

    ids = eval_ids()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    saved = (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert saved
    fresh = AutoModelForSequenceClassification.from_pretrained(str(packed_dir))
    reloaded = load_lora_adapter(fresh, str(tmp_path / "adapter"))
    assert torch.equal(logits(reloaded, ids), expected)

    with pytest.raises(ValueError, match="merge_lora_into_latent"):
        model.merge_adapter()

    merged = merge_lora_into_latent(model)
    adapted = {k.removeprefix("base_model.model.").removesuffix(".base_layer.weight") for k in packed_before}
    adapted = {k for k in adapted if any(k.endswith(t) for t in TARGETS)}
    assert len(adapted) == 6 and set(stompp_modules(merged)) == adapted  # the adapted layers are latent again
    assert sum(isinstance(m, BinaryLinear) for m in merged.modules()) == 7  # the others stay packed
    assert binarization_progress(merged).complete
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
    assert all(not isinstance(m, StoMPPLinear) for m in again.modules())
    assert torch.equal(logits(again, ids), logits(merged, ids))


def test_merge_weight_is_unpacked_plus_delta(packed_dir):
    model = lora_model(packed_dir)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    expected = layer.get_base_layer().unpacked_weight(torch.float32) + layer.get_delta_weight("default")
    merged = merge_lora_into_latent(model)
    latent = merged.bert.encoder.layer[0].attention.self.query
    assert torch.equal(latent.weight, expected)
    assert latent.weight_frozen_fraction == 1.0 and latent.input_frozen_fraction == 1.0
    assert torch.equal(latent.input_binarizer.scale, layer.get_base_layer().input_scale)


def test_lora_on_latent_stompp_model_merges_into_latent_weights(tmp_path):
    model = load_stompp(fp_checkpoint(tmp_path), StoMPPConfig())
    train_to_freeze(model)
    query = model.bert.encoder.layer[0].attention.self.query
    before = query.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["query"], lora_dropout=0.0))
    assert isinstance(peft_model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer, StoMPPLinear)
    wrapped = peft_model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        wrapped.lora_B["default"].weight.fill_(0.5)
    delta = wrapped.get_delta_weight("default")
    merged = peft_model.merge_and_unload()
    assert torch.equal(merged.bert.encoder.layer[0].attention.self.query.weight, before + delta)


def test_packed_layer_passes_a_clipped_ste_gradient_with_identical_values():
    """W = [+1, -1, +1] packed, beta = 2, x = [1, -5, 0.5]: out = 2 * (1 + 1 + 1) = 6; dx = W * 1{|x| <= 2}."""
    from stompp_hf.core.packing import pack_signs

    layer = BinaryLinear(3, 1, bias=False, weight_scale=False)
    layer.weight.copy_(pack_signs(torch.tensor([[True, False, True]])))
    layer.input_scale.fill_(2.0)
    x = torch.tensor([[1.0, -5.0, 0.5]], requires_grad=True)
    out = layer(x)
    assert out.item() == 6.0
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0, 1.0]]))
    with torch.no_grad():
        assert torch.equal(layer(x), out.detach())
