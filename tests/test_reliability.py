"""Bad input and faults (docs/reliability.md): each case gives a clear error or a documented, tested behaviour."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import BertForSequenceClassification, TrainerCallback

from stompp_hf import ProgressionController, StoMPPConfig, stompp_modules

from .testing_utils import eval_ids, logits, tiny_bert_config, trainer_for


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


@pytest.mark.parametrize("rules", [{}, {"weights": "stompp_ste", "activations": "stompp_ste"}, {"weights": "ste"}])
@pytest.mark.parametrize("progress", [0, 3, 8], ids=["continuous", "mid-progression", "fully-frozen"])
def test_binarized_layers_keep_the_autocast_dtype(rules, progress):
    """Under CPU bf16 autocast every binarized layer returns bf16, as the nn.Linear it replaces does: continuous,
    transitioning and frozen (the factored form, whose float32 bias once promoted the output and every op after it to
    float32)."""
    from stompp_hf import prepare_model

    torch.manual_seed(0)
    model = prepare_model(BertForSequenceClassification(tiny_bert_config()), StoMPPConfig(**rules))
    controller = ProgressionController(model, total_steps=8)
    controller.advance(progress)
    dtypes = {}
    for name, module in stompp_modules(model).items():
        module.register_forward_hook(lambda m, a, out, name=name: dtypes.__setitem__(name, out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=eval_ids())
    assert dtypes and set(dtypes.values()) == {torch.bfloat16}, dtypes


@pytest.mark.parametrize(
    "rules",
    [
        {},  # StoMPP weights and inputs
        {"weights": "stompp_ste", "activations": "stompp_ste"},
        {"weights": "ste", "activations": "ste"},
        {"weights": "stompp", "activations": None},  # a BWN
        {"weights": "stompp_ste", "activations": "stompp_ste", "compensation": "surge"},
        {"weights": "ste", "activations": "ste", "activation_scale": "none"},  # the raw setting
    ],
    ids=["stompp", "stompp_ste", "ste", "bwn", "surge", "ste_raw"],
)
def test_bf16_mixed_precision_on_cpu_trains_and_exports(tiny_bert_dir, tmp_path, rules):
    """`bf16=True` on CPU (autocast) trains every rule to the end and exports a packed model whose reload gives
    bit-identical logits."""
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig(**rules))
    trainer = trainer_for(model, tmp_path / "run", bf16=True)
    trainer.train()
    assert all(m.fully_frozen for m in stompp_modules(model).values())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    # accelerate leaves an autocast wrapper on `forward` after bf16 training; compare in float32 without it
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert torch.equal(logits(reloaded, eval_ids()), logits(model, eval_ids()))
