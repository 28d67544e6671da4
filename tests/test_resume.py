"""Exact resume: a run interrupted at step k and resumed with `resume_from_checkpoint` ends with the same weights,
masks and activation scales, bit for bit, as the uninterrupted run (CPU, deterministic)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

from stompp_hf import StoMPPCallback, StoMPPConfig, stompp_modules

from .testing_utils import toy_dataset

MAX_STEPS = 12


def make_trainer(model_dir, out, config, accumulation, fraction, save_steps=None):
    model = BertForSequenceClassification.from_pretrained(model_dir, quantization_config=config)
    args = TrainingArguments(
        str(out),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        disable_tqdm=True,
        seed=0,
        full_determinism=True,
    )
    callback = StoMPPCallback(progression_fraction=fraction)
    return Trainer(model=model, args=args, train_dataset=toy_dataset(), callbacks=[callback])


def final_state(model) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in stompp_modules(model).items():
        state[f"{name}.weight_mask"] = module.weight_mask.clone()
        state[f"{name}.input_mask"] = module.input_mask.clone()
    return state


@pytest.mark.parametrize(
    "interrupt, accumulation, fraction, compensation",
    [
        (3, 1, 1.0, None),  # mid-stage (2 encoder blocks + pooler over 12 steps: a stage lasts 4 steps)
        (5, 2, 1.0, None),  # mid-stage, with gradient accumulation
        (9, 1, 0.5, None),  # after the progression ended: resuming the fully binary phase
        (3, 1, 1.0, "surge"),  # SURGE's auxiliary weights resume too
    ],
)
def test_resume_equals_uninterrupted(tiny_bert_dir, tmp_path, interrupt, accumulation, fraction, compensation):
    config = StoMPPConfig(
        weights="stompp_ste",
        activations="stompp_ste",
        refresh_rate=3,
        schedule="linear",
        compensation=compensation,
    )
    uninterrupted = make_trainer(tiny_bert_dir, tmp_path / "a", config, accumulation, fraction, save_steps=interrupt)
    uninterrupted.train()
    expected = final_state(uninterrupted.model)
    checkpoint = tmp_path / "a" / f"checkpoint-{interrupt}"
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:  # the masks travel with the weights
        assert any(k.endswith("weight_binarizer._extra_state") for k in f.keys())

    resumed = make_trainer(tiny_bert_dir, tmp_path / "b", config, accumulation, fraction)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == MAX_STEPS
    actual = final_state(resumed.model)
    assert actual.keys() == expected.keys()
    differing = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not differing, f"differs after resume: {differing[:5]}"
