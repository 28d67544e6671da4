"""Bad input and faults (docs/reliability.md): each case gives a clear error or a documented, tested behaviour."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
from transformers import BertForSequenceClassification, TrainerCallback

from stompp_hf import ProgressionController, StoMPPCallback, StoMPPConfig, stompp_modules
from stompp_hf.integrations.transformers.hub import model_card

from .testing_utils import eval_ids, fp_checkpoint, load_stompp, logits, tiny_bert_config, train_to_freeze, trainer_for


def test_packed_checkpoint_without_stompp_hf_import_is_documented(tmp_path):
    model = load_stompp(fp_checkpoint(tmp_path), StoMPPConfig())
    train_to_freeze(model)
    model.save_pretrained(tmp_path / "packed")
    code = (
        "import sys\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'packed')!r})\n"
        "assert 'stompp_hf' not in sys.modules\n"
        "print(type(m.bert.encoder.layer[0].attention.self.query).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # Transformers skips the unknown method: plain, randomly initialised Linear layers, reported in its load table.
    assert done.stdout.strip().endswith("Linear")
    assert "MISSING" in done.stderr and "weight_packed" in done.stderr
    assert "Without it the model loads silently broken" in model_card(model, "me/x").text


class PoisonWeight(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            with torch.no_grad():
                next(iter(stompp_modules(model).values())).weight[0, 0] = float("nan")


def test_diverged_weights_stop_training_with_a_clear_error(tiny_bert_dir, tmp_path):
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    trainer = trainer_for(model, tmp_path, callbacks=[PoisonWeight()])
    with pytest.raises(RuntimeError, match=r"latent weight of `bert\.encoder\.layer\.0.*NaN / Inf values at step 2"):
        trainer.train()


def test_fewer_steps_than_stages_warns_and_still_ends_binary(tiny_bert_dir, tmp_path, caplog):
    model = BertForSequenceClassification.from_pretrained(
        tiny_bert_dir, quantization_config=StoMPPConfig(granularity="module")
    )
    with caplog.at_level(logging.WARNING, logger="stompp_hf"):
        trainer_for(model, tmp_path, max_steps=2).train()
    assert "several stages will freeze within one step" in caplog.text
    assert all(m.fully_frozen for m in stompp_modules(model).values())


def _masked_model(compensation=None):
    torch.manual_seed(0)
    config = tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    from stompp_hf import prepare_model

    prepare_model(model, StoMPPConfig(weights="stompp_ste", activations="stompp_ste", compensation=compensation))
    controller = ProgressionController(model, total_steps=8)
    for step in range(1, 4):  # mid-progression: stage 0 partially frozen
        controller.advance(step)
    return model.train()


def _loss_and_grads(model, ids, labels):
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    module = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: name parameters as the model does
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("compensation", [None, "surge"])
def test_gradient_checkpointing_gives_the_same_step(compensation):
    """Same loss, gradients and activation scales with and without checkpointing: the recomputed forward (inside
    the backward pass) reuses beta instead of updating its running mean a second time."""
    ids, labels = eval_ids(), torch.tensor([0, 1, 1])
    model = _masked_model(compensation)
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable({"use_reentrant": False})
    loss, grads = _loss_and_grads(model, ids, labels)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, ids, labels)
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name
    betas = {n: b for n, b in model.named_buffers() if n.endswith("input_binarizer.scale")}
    assert betas and all(torch.equal(b, checkpointed.get_buffer(n)) for n, b in betas.items())


def test_torch_compile_traces_a_training_step():
    """The masked binarize (a custom autograd Function) and the mask state compile; values and gradients agree
    with eager. `aot_eager` checks the capture without C++ code generation (the inductor run is in the docs)."""
    ids, labels = eval_ids(), torch.tensor([0, 1, 1])
    model = _masked_model()
    reference = copy.deepcopy(model)  # each forward moves beta's running mean: start both from the same state
    loss, grads = _loss_and_grads(reference, ids, labels)
    compiled = torch.compile(model, backend="aot_eager")
    loss_c, grads_c = _loss_and_grads(compiled, ids, labels)
    torch.testing.assert_close(loss_c, loss)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], msg=name)


def test_bf16_mixed_precision_on_cpu_trains_and_exports(tiny_bert_dir, tmp_path):
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    trainer = trainer_for(model, tmp_path / "run", bf16=True)
    trainer.train()
    assert all(m.fully_frozen for m in stompp_modules(model).values())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    # accelerate leaves an autocast wrapper on `forward` after bf16 training; compare in float32 without it
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert torch.equal(logits(reloaded, eval_ids()), logits(model, eval_ids()))


def test_interrupted_mask_save_keeps_the_previous_file(tiny_bert_dir, tmp_path, monkeypatch):
    import stompp_hf.integrations.transformers.callback as callback_module

    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    trainer = trainer_for(model, tmp_path, max_steps=3, save_strategy="steps", save_steps=2)
    trainer.train()
    folder = tmp_path / "checkpoint-2"
    mask_file = folder / callback_module.MASKS_FILE
    before = mask_file.read_bytes()
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StoMPPCallback))

    def failing_save(tensors, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(callback_module, "save_file", failing_save)
    trainer.state.global_step = 2
    with pytest.raises(OSError, match="disk full"):
        callback.on_save(trainer.args, trainer.state, trainer.control)
    assert mask_file.read_bytes() == before
    assert not any(p.endswith(callback_module.MASKS_FILE) and p != mask_file.name for p in os.listdir(folder))
