"""Checks a resume cannot bypass, latent checkpoints that keep their masks, wrapped models, the best model of a
progression, and NaN inputs in training (docs/reliability.md)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from stompp_hf import ProgressionController, StoMPPCallback, StoMPPConfig, stompp_modules
from stompp_hf.core.masks import TRANSITIONING, MaskState, decode_mask_state, encode_mask_state
from stompp_hf.progression import commit, saved_progress

from .testing_utils import (
    batches,
    eval_ids,
    fp_checkpoint,
    load_stompp,
    logits,
    toy_dataset,
    train_to_freeze,
    trainer_for,
)

CONFIG = dict(refresh_rate=4, schedule="linear")


def checkpoint(tiny_bert_dir, out, config=CONFIG, step=3, **kwargs):
    """Train 6 steps from `tiny_bert_dir` saving every `step`; return checkpoint-`step`."""
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig(**config))
    trainer_for(model, out, save_strategy="steps", save_steps=step, **kwargs).train()
    return out / f"checkpoint-{step}"


def resume(tiny_bert_dir, out, ckpt, config=CONFIG, **kwargs):
    """Resume `ckpt` from another output folder with `config` (the resumed checkpoint's files are all it has)."""
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig(**config))
    trainer = trainer_for(model, out, **kwargs)
    trainer.train(resume_from_checkpoint=str(ckpt))
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# 1. the resume check reads the resumed checkpoint's own files and compares the whole config


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(order="reverse"), r"`order`: 'forward' \(checkpoint\) vs 'reverse' \(now\)"),
        (dict(weights="stompp_ste"), r"`weights`: 'stompp' \(checkpoint\) vs 'stompp_ste' \(now\)"),
        (dict(activation_clip=2.0), r"`activation_clip`: 1\.0 \(checkpoint\) vs 2\.0 \(now\)"),
    ],
    ids=["order", "rule", "activation_clip"],
)
def test_resume_from_another_folder_with_a_changed_config_names_the_fields(tiny_bert_dir, tmp_path, change, message):
    ckpt = checkpoint(tiny_bert_dir, tmp_path / "a")
    with pytest.raises(ValueError, match=message):
        resume(tiny_bert_dir, tmp_path / "b", ckpt, {**CONFIG, **change})


def test_change_at_a_stage_boundary_is_caught(tiny_bert_dir, tmp_path):
    # progression over half of 6 steps: at step 4 every mask is frozen, none transitioning
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig(**CONFIG))
    trainer = trainer_for(model, tmp_path / "a", save_strategy="steps", save_steps=4)
    next(c for c in trainer.callback_handler.callbacks if isinstance(c, StoMPPCallback)).progression_fraction = 0.5
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert not any(m.weight_binarizer.mask.is_transitioning for m in stompp_modules(model).values())
    with pytest.raises(ValueError, match=r"`activation_clip`"):
        resume(tiny_bert_dir, tmp_path / "b", ckpt, {**CONFIG, "activation_clip": 0.5})


def test_changed_max_steps_says_so(tiny_bert_dir, tmp_path):
    ckpt = checkpoint(tiny_bert_dir, tmp_path / "a")
    with pytest.raises(ValueError, match=r"spans 6 optimizer steps, this run's 8 \(max_steps=8.*`max_steps`"):
        resume(tiny_bert_dir, tmp_path / "b", ckpt, max_steps=8)


def test_tampered_masks_in_the_resumed_checkpoint_are_caught(tiny_bert_dir, tmp_path):
    ckpt = checkpoint(tiny_bert_dir, tmp_path / "a")
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    key = next(
        k for k, v in tensors.items() if k.endswith("_extra_state") and decode_mask_state(v)[0] == TRANSITIONING
    )
    code, mask, step, total, numel = decode_mask_state(tensors[key])
    state = MaskState((numel,))
    state.value = ~mask  # every entry flipped
    tensors[key] = encode_mask_state(state, step, total)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"differ from the \d+ stored in the checkpoint's weights"):
        resume(tiny_bert_dir, tmp_path / "b", ckpt)


def test_unchanged_resume_from_another_folder_passes_every_check(tiny_bert_dir, tmp_path):
    ckpt = checkpoint(tiny_bert_dir, tmp_path / "a")
    trainer = resume(tiny_bert_dir, tmp_path / "b", ckpt)
    assert trainer.state.global_step == 6
    assert all(m.fully_frozen for m in stompp_modules(trainer.model).values())


# ---------------------------------------------------------------------------------------------------------------
# 2. a latent save_pretrained mid-progression keeps masks and step: reload + continue is exact


def test_latent_save_mid_progression_reloads_its_masks_and_continues_exactly(tmp_path):
    fp = fp_checkpoint(tmp_path)
    model = load_stompp(fp, StoMPPConfig(**CONFIG))
    controller = train_to_freeze(model, total_steps=8, train_steps=3)
    assert any(m.weight_binarizer.mask.is_transitioning for m in stompp_modules(model).values())
    model.save_pretrained(tmp_path / "latent")
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "latent"))
    assert saved_progress(reloaded) == (3, 8)
    assert torch.equal(logits(reloaded, eval_ids()), logits(model, eval_ids()))  # the masks came back

    def continue_training(m, ctl):
        optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        m.train()
        for step, (ids, labels) in enumerate(batches(5, seed=7), start=4):
            loss = m(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctl.advance(step)
        return logits(m, eval_ids())

    torch.manual_seed(1)
    expected = continue_training(model, controller)
    torch.manual_seed(1)
    actual = continue_training(reloaded, ProgressionController.resume(reloaded))
    assert torch.equal(actual, expected)
    assert all(m.fully_frozen for m in stompp_modules(reloaded).values())


def test_resume_of_a_checkpoint_saved_with_another_config_is_refused(tmp_path):
    model = load_stompp(fp_checkpoint(tmp_path), StoMPPConfig(**CONFIG))
    train_to_freeze(model, total_steps=8, train_steps=3)
    model.save_pretrained(tmp_path / "latent")
    data = json.loads((tmp_path / "latent" / "config.json").read_text())
    data["quantization_config"]["seed"] = 5
    (tmp_path / "latent" / "config.json").write_text(json.dumps(data))
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "latent"))
    with pytest.raises(ValueError, match="differ from the checkpoint's"):
        ProgressionController.resume(reloaded)


# ---------------------------------------------------------------------------------------------------------------
# 3. wrapped models: checkpoints during training are latent whatever wraps the model


class Wrapper(torch.nn.Module):
    """A model that wraps a `PreTrainedModel` and saves through it, as a SentenceTransformer does."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids=None, labels=None, **kwargs):
        return self.inner(input_ids=input_ids, labels=labels)

    def save_pretrained(self, path, **kwargs):
        self.inner.save_pretrained(path, **kwargs)


class SaveInnerAfterEachStep(TrainerCallback):
    def __init__(self, inner, folder) -> None:
        self.inner, self.folder = inner, folder

    def on_step_end(self, args, state, control, **kwargs):
        self.inner.save_pretrained(self.folder / f"step-{state.global_step}")


def test_checkpoints_of_a_wrapped_model_stay_latent_while_training(tiny_bert_dir, tmp_path):
    inner = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig(**CONFIG))
    trainer = trainer_for(Wrapper(inner), tmp_path, callbacks=[SaveInnerAfterEachStep(inner, tmp_path)])
    trainer.train()
    last = json.loads((tmp_path / "step-6" / "config.json").read_text())
    assert last["quantization_config"]["packed"] is False  # the progression ended at step 6, training had not
    inner.save_pretrained(tmp_path / "final")
    assert json.loads((tmp_path / "final" / "config.json").read_text())["quantization_config"]["packed"] is True


# ---------------------------------------------------------------------------------------------------------------
# 4. load_best_model_at_end with the best checkpoint mid-progression


def test_best_model_from_mid_progression_warns_and_commit_exports_it(tiny_bert_dir, tmp_path):
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig(**CONFIG))
    args = TrainingArguments(
        str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
    )
    data = toy_dataset()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[StoMPPCallback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "StoMPP" in str(w.message)]
    assert any("ranks checkpoints by `loss`" in m for m in messages)
    best = trainer.state.best_model_checkpoint
    if not best.endswith("checkpoint-6"):
        assert any("`load_best_model_at_end` loaded" in m for m in messages)
        assert saved_progress(model)[0] < 6
        commit(model)
    assert all(m.fully_frozen for m in stompp_modules(model).values())
    model.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["quantization_config"]["packed"] is True


def test_recipes_rank_checkpoints_by_the_binarized_metric(tmp_path):
    from stompp_hf_recipes.common import rank_checkpoints_by_binarized

    args = TrainingArguments(str(tmp_path), load_best_model_at_end=True, eval_strategy="steps", save_steps=500)
    assert args.metric_for_best_model == "loss"
    rank_checkpoints_by_binarized(args, "accuracy", StoMPPConfig())
    assert args.metric_for_best_model == "binarized_accuracy" and args.greater_is_better


# ---------------------------------------------------------------------------------------------------------------
# 5. NaN inputs in training stop the run at the next logging step


class PoisonInput(TrainerCallback):
    def __init__(self, model) -> None:
        layer = next(iter(stompp_modules(model).values()))
        self.handle = layer.register_forward_pre_hook(self.hook)
        self.step = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step

    def hook(self, module, args):
        if self.step == 1:
            return (torch.full_like(args[0], float("nan")),)
        return None


def test_nan_input_in_training_stops_with_a_clear_error(tiny_bert_dir, tmp_path):
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    trainer = trainer_for(model, tmp_path, callbacks=[PoisonInput(model)])
    with pytest.raises(RuntimeError, match=r"activation scale of `bert\.encoder\.layer\.0.*is nan at step 2"):
        trainer.train()
