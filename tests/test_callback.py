"""`StoMPPCallback` under a real `Trainer`: planner invariants, refresh bounds, logging, resume, evaluation."""

import json
import os

import pytest
import torch
from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from stompp_hf import StoMPPCallback, StoMPPConfig, binarized, stompp_modules

from .testing_utils import toy_dataset


class MaskRecorder(TrainerCallback):
    """Runs after StoMPPCallback: snapshots every mask after each optimizer step."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        snap = {}
        for name, m in stompp_modules(model).items():
            snap[name] = (m.stompp_stage, m.weight_mask.clone(), m.input_mask.clone())
        self.steps.append((state.global_step, snap))


def train(model_dir, tmp_path, config, max_steps=12, accumulation=1, callback=None, **args):
    model = BertForSequenceClassification.from_pretrained(model_dir, quantization_config=config)
    recorder = MaskRecorder()
    args.setdefault("save_strategy", "no")
    args.setdefault("report_to", [])
    targs = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **args,
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=toy_dataset(), callbacks=[callback or StoMPPCallback(), recorder]
    )
    trainer.train()
    return model, trainer, recorder


def stage_state(snap, stage):
    """'zeros', 'ones' or 'partial' for all masks of a stage."""
    masks = [t for s, w, i in snap.values() if s == stage for t in (w, i)]
    if all(bool(m.all()) for m in masks):
        return "ones"
    if not any(bool(m.any()) for m in masks):
        return "zeros"
    return "partial"


@pytest.mark.parametrize("order", ["forward", "reverse", "global"])
def test_planner_invariants_at_every_step(tiny_bert_dir, tmp_path, order):
    config = StoMPPConfig(order=order, refresh_rate=4, schedule="linear")
    model, _, recorder = train(tiny_bert_dir, tmp_path, config, max_steps=12)
    assert len(recorder.steps) == 12
    n_stages = 3
    seen_partial = set()
    for step, snap in recorder.steps:
        states = [stage_state(snap, s) for s in range(n_stages)]
        seen_partial.update(s for s, st in enumerate(states) if st == "partial")
        if order == "forward":  # a later stage is never frozen at all while an earlier one is incomplete
            for s in range(1, n_stages):
                if states[s - 1] != "ones":
                    assert states[s] == "zeros", (step, states)
        elif order == "reverse":
            for s in range(n_stages - 1):
                if states[s + 1] != "ones":
                    assert states[s] == "zeros", (step, states)
        else:  # global: every stage moves together
            if step < 12:
                assert all(st != "ones" for st in states), (step, states)
    assert seen_partial == {0, 1, 2}  # every stage did transition through a partial mask
    # at the last step every scheduled tensor is frozen
    assert all(
        m.weight_frozen_fraction == 1.0 and m.input_frozen_fraction == 1.0 for m in stompp_modules(model).values()
    )


def test_per_step_mask_changes_are_bounded(tiny_bert_dir, tmp_path):
    r = 4
    _, _, recorder = train(tiny_bert_dir, tmp_path, StoMPPConfig(refresh_rate=r, order="global"), max_steps=8)
    previous = None
    for step, snap in recorder.steps:
        if previous is not None and step < 8:  # the final step forces everything frozen by design
            for name, (_, w, i) in snap.items():
                _, pw, pi = previous[name]
                assert int((w != pw).sum()) <= w.numel() // r
                assert int((i != pi).sum()) <= i.numel() // r
        previous = snap


def test_gradient_accumulation_advances_once_per_optimizer_step(tiny_bert_dir, tmp_path):
    _, trainer, recorder = train(tiny_bert_dir, tmp_path, StoMPPConfig(), max_steps=6, accumulation=2)
    assert [s for s, _ in recorder.steps] == [1, 2, 3, 4, 5, 6]
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StoMPPCallback))
    assert cb.controller.step == 6 and cb.controller.total_steps == 6


def test_progress_is_logged(tiny_bert_dir, tmp_path):
    _, trainer, _ = train(
        tiny_bert_dir, tmp_path, StoMPPConfig(), max_steps=6, callback=StoMPPCallback(progression_fraction=0.5)
    )
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # 3 progression steps for 3 stages: stage s is frozen after step s + 1, the rest is fully binary
    assert [h["stompp/stage"] for h in logs] == [1.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    assert logs[-1]["stompp/weight_frozen_fraction"] == 1.0 and logs[-1]["stompp/input_frozen_fraction"] == 1.0
    assert logs[0]["stompp/num_stages"] == 3.0


def test_progress_reaches_tensorboard(tiny_bert_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    train(tiny_bert_dir, tmp_path, StoMPPConfig(), max_steps=4, report_to=["tensorboard"])
    tags = set()
    for root, _, files in os.walk(logdir):
        for f in files:
            if "tfevents" in f:
                acc = EventAccumulator(os.path.join(root, f))
                acc.Reload()
                tags.update(acc.Tags()["scalars"])
    assert {"train/stompp/stage", "train/stompp/weight_frozen_fraction", "train/loss"} <= tags


def test_checkpoint_resume_restores_position_and_masks(tiny_bert_dir, tmp_path):
    config = StoMPPConfig(refresh_rate=4, schedule="linear")
    full_model, _, full = train(
        tiny_bert_dir, tmp_path / "a", config, max_steps=9, save_strategy="steps", save_steps=4
    )
    ckpt = tmp_path / "a" / "run" / "checkpoint-4"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["StoMPPCallback"]
    assert saved["attributes"]["step"] == 4
    record = saved["attributes"]["checkpoint"]
    assert record["total_steps"] == 9 and record["config"]["refresh_rate"] == 4 and len(record["masks_sha256"]) == 64

    model = BertForSequenceClassification.from_pretrained(str(ckpt))
    recorder = MaskRecorder()
    targs = TrainingArguments(
        str(tmp_path / "a" / "run"),
        max_steps=9,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=toy_dataset(), callbacks=[StoMPPCallback(), recorder])
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert [s for s, _ in recorder.steps] == [5, 6, 7, 8, 9]
    reference = dict(full.steps)
    for step, snap in recorder.steps:  # masks continue exactly where the uninterrupted run went
        for name, (_, w, i) in snap.items():
            assert torch.equal(w, reference[step][name][1]) and torch.equal(i, reference[step][name][2])


def test_binarized_evaluates_all_frozen_without_changing_state(tiny_bert_dir):
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    model.eval()
    x = torch.randint(5, 60, (2, 8))
    for name, b in model.named_buffers():
        if name.endswith("input_binarizer.scale"):
            b.fill_(0.5)  # as if measured in training
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    continuous = model(input_ids=x).logits
    with binarized(model):
        binary = model(input_ids=x).logits
    assert not torch.equal(continuous, binary)
    assert torch.equal(model(input_ids=x).logits, continuous)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(m.weight_frozen_fraction == 0.0 for m in stompp_modules(model).values())
    # a fully binarized layer computes (sign(x) @ sign(W)^T) * (beta * alpha) + b, the scales on the output
    layer = model.bert.pooler.dense
    h = torch.randn(3, 32)
    h[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    with binarized(model):
        out = layer(h)
    beta = layer.input_binarizer.scale
    alpha = layer.weight.abs().mean(dim=1)
    signs = torch.nn.functional.linear(torch.where(h >= 0, 1.0, -1.0), torch.where(layer.weight >= 0, 1.0, -1.0))
    assert torch.equal(signs, signs.round()) and signs.abs().max() <= 32  # exact integers
    torch.testing.assert_close(out, signs * (beta * alpha) + layer.bias, atol=0, rtol=0)
    # ... which is beta * sign(x) @ (alpha * sign(W))^T + b up to float rounding
    unfactored = torch.nn.functional.linear(
        beta * torch.where(h >= 0, 1.0, -1.0), alpha[:, None] * torch.where(layer.weight >= 0, 1.0, -1.0), layer.bias
    )
    torch.testing.assert_close(out, unfactored)


def test_training_without_callback_warns(tiny_bert_dir):
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    model.train()
    with pytest.warns(UserWarning, match="trained without a StoMPPCallback"):
        model(input_ids=torch.randint(5, 60, (2, 8)))


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="at most one of"):
        StoMPPCallback(progression_steps=10, progression_fraction=0.5)
    with pytest.raises(ValueError, match=r"`progression_fraction` must be in \(0, 1\], but got 1.5"):
        StoMPPCallback(progression_fraction=1.5)
    with pytest.raises(ValueError, match=r"`progression_steps` must be an int >= 1, but got 0"):
        StoMPPCallback(progression_steps=0)


def test_resume_with_another_seed_names_the_field(tiny_bert_dir, tmp_path):
    train(
        tiny_bert_dir,
        tmp_path,
        StoMPPConfig(refresh_rate=4, schedule="linear"),
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
    )
    ckpt = tmp_path / "run" / "checkpoint-3"
    model = BertForSequenceClassification.from_pretrained(str(ckpt))
    model.config.quantization_config.seed = 99
    model.stompp_config.seed = 99
    targs = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=toy_dataset(), callbacks=[StoMPPCallback()])
    with pytest.raises(ValueError, match=r"`seed`: 0 \(checkpoint\) vs 99 \(now\)"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert os.path.isdir(ckpt)


@pytest.mark.parametrize("native, bf16, warns", [(False, True, True), (True, True, False), (False, False, False)])
def test_warns_when_bf16_would_be_emulated_on_this_cpu(monkeypatch, tmp_path, native, bf16, warns):
    import warnings

    from stompp_hf.integrations.transformers import callback

    monkeypatch.setattr(callback, "has_native_bf16", lambda: native)
    args = TrainingArguments(str(tmp_path), use_cpu=True, bf16=bf16, report_to="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback._check_cpu_bf16(args)
    messages = [str(w.message) for w in caught if "bf16 instructions" in str(w.message)]
    assert len(messages) == int(warns)
    if warns:
        assert "bf16=False" in messages[0] and callback.cpu_model() in messages[0]
