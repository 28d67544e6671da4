"""How real code calls a StoMPP model: inference under `torch.inference_mode()` (sentence-transformers' `encode`), and
several forward passes before one backward (contrastive losses, sentence-transformers' trainer).

Both give exactly what the single, grad-mode forward gives: the same outputs, the same activation scales (beta), and
gradients equal to the sum of the gradients of the forwards run one at a time.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stompp_hf import ProgressionController, StoMPPConfig, StoMPPConv2d, StoMPPLinear, binarized, stompp_modules
from stompp_hf.nn import StoMPPActivation

# ---------------------------------------------------------------------------------------------------------------
# single modules in every state

RULES = ["stompp", "stompp_ste", "ste"]
# "mixed": the input frozen, the weight transitioning (a layer between its input's stage and its weight's, with
# `granularity="layer"`): its weight gradient comes from the input recomputed with this forward's beta
STATES = ["continuous", "mid", "frozen", "mixed"]
# 'ste' is frozen whatever its mask, so it has one state
CASES = [(r, s) for r in RULES for s in STATES if r != "ste" or s == "frozen"]
# kind: per-sample input shape. "conv_weights" is a convolution at an activation site (`activation_sites=
# "activation"`): the StoMPPActivation before it binarizes its input, so it binarizes its weight only.
KINDS = {"linear": (13,), "conv": (3, 7, 7), "conv_weights": (3, 7, 7), "activation": (3, 7, 7)}
MODULES = [(k, c) for k in KINDS for c in (None, "surge") if not (k == "activation" and c)]


def _module(kind, rule, state, compensation, clip=1.0, seed=0):
    torch.manual_seed(seed)
    config = StoMPPConfig(weights=rule, activations=rule, compensation=compensation, activation_clip=clip)
    shape = KINDS[kind]
    if kind == "linear":
        module = StoMPPLinear.from_module(nn.Linear(13, 6), config)
    elif kind == "activation":
        module = StoMPPActivation.from_config(config, shape)
    else:
        module = StoMPPConv2d.from_module(
            nn.Conv2d(3, 6, 3, padding=1), config, input_shape=shape, binarize_input=kind == "conv"
        )
    generator = torch.Generator().manual_seed(seed + 1)
    for b in module.binarizers():
        b.controlled = True
        if state == "mid" or (state == "mixed" and b.kind == "weight"):  # a bool tensor, about half of it frozen
            b.mask.value = torch.rand(b.mask.shape, generator=generator) < 0.5
        else:
            b.mask.fill(state in ("frozen", "mixed"))
    module.train()
    with torch.no_grad():  # measure beta, so that the next forwards take its running mean
        module(_inputs(kind, seed=seed + 2))
    return module


def _inputs(kind, seed, batch=4):
    return 1.5 * torch.randn((batch, *KINDS[kind]), generator=torch.Generator().manual_seed(seed))


def _betas(module):
    return [b.scale.clone() for b in module.binarizers() if b.scale is not None]


def _run(module, x, context):
    """`module(x)` with `x` made where real callers make it: an inference tensor under `inference_mode`."""
    if context == "grad":
        return module(x.clone().requires_grad_(True)).detach()
    if context == "no_grad":
        with torch.no_grad():
            return module(x.clone())
    if context == "inference_mode":
        with torch.inference_mode():
            return module(x.clone())
    # grad mode, but nothing can have a backward: an inference tensor fed to a module whose parameters are frozen
    with torch.inference_mode():
        x = x.clone()
    module.requires_grad_(False)
    return module(x)


@pytest.mark.parametrize("context", ["inference_mode", "no_grad", "frozen_parameters"])
@pytest.mark.parametrize("rule,state", CASES, ids=[f"{r}-{s}" for r, s in CASES])
@pytest.mark.parametrize("kind,compensation", MODULES, ids=[f"{k}-{c or 'plain'}" for k, c in MODULES])
def test_inference_mode_gives_the_grad_mode_outputs(kind, compensation, rule, state, context):
    """No `_version` read on inference tensors; train mode (beta moves) and eval mode, bit for bit."""
    for mode in ("train", "eval"):
        module = _module(kind, rule, state, compensation).train(mode == "train")
        reference = copy.deepcopy(module)
        x = _inputs(kind, seed=5)
        for step in range(2):  # twice: the second forward takes the running mean the first one moved
            expected = _run(reference, x + step, "grad")
            got = _run(module, x + step, context)
            assert torch.equal(got, expected), (mode, step)
            assert all(torch.equal(a, b) for a, b in zip(_betas(module), _betas(reference))), (mode, step)
        if state == "mid" and kind != "activation":
            with binarized(module), torch.inference_mode():
                frozen_all = module(x.clone())
            with binarized(reference):
                assert torch.equal(frozen_all, reference(x.clone().requires_grad_(True)).detach())


def _grads(module, xs):
    named = [(n, p.grad) for n, p in module.named_parameters()] + [(f"x{i}", x.grad) for i, x in enumerate(xs)]
    return {n: None if g is None else g.clone() for n, g in named}


def _loss(module, x, seed):
    out = module(x)
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))).sum()


def _backward(loss):
    if loss.requires_grad:  # a frozen 'stompp' activation is a constant: nothing to differentiate
        loss.backward()


@pytest.mark.parametrize("clip", [1.0, 3.0], ids=["clip1", "clip3"])
@pytest.mark.parametrize("rule,state", CASES, ids=[f"{r}-{s}" for r, s in CASES])
@pytest.mark.parametrize("kind,compensation", MODULES, ids=[f"{k}-{c or 'plain'}" for k, c in MODULES])
def test_two_forwards_then_one_backward(kind, compensation, rule, state, clip):
    """`(f(x1) + f(x2)).backward()` gives exactly the gradients of `f(x1).backward(); f(x2).backward()` from the same
    state (the same beta updates in the same order), and the same final beta."""
    one_at_a_time = _module(kind, rule, state, compensation, clip)
    together = copy.deepcopy(one_at_a_time)
    inputs = [_inputs(kind, seed=s) for s in (11, 12)]

    xs_a = [x.clone().requires_grad_(True) for x in inputs]
    for i, x in enumerate(xs_a):
        _backward(_loss(one_at_a_time, x, seed=20 + i))
    xs_b = [x.clone().requires_grad_(True) for x in inputs]
    _backward(sum(_loss(together, x, seed=20 + i) for i, x in enumerate(xs_b)))

    expected, got = _grads(one_at_a_time, xs_a), _grads(together, xs_b)
    constant = kind == "activation" and rule == "stompp" and state in ("frozen", "mixed")  # the gradient blockade
    assert any(g is not None for g in expected.values()) != constant
    for name, g in expected.items():
        assert (g is None) == (got[name] is None), name
        assert g is None or torch.equal(got[name], g), name
    assert all(torch.equal(a, b) for a, b in zip(_betas(together), _betas(one_at_a_time)))


# ---------------------------------------------------------------------------------------------------------------
# a vision BNN at its activation sites (StoMPP Table 6), mid-progression


def _resnet(rule):
    import timm

    import stompp_hf.integrations.timm.cifar_resnet  # noqa: F401  (registers cifar_resnet* with timm)
    from stompp_hf import prepare_model

    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=10, in_chans=1, channels=(8, 8, 16))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, 12, 12)}
    config = StoMPPConfig(
        weights=rule, activations=rule, weight_scale="none", activation_scale="tensor", refresh_rate=1
    )
    prepare_model(model, config)
    assert model.stompp_config.activation_sites == "activation"
    ProgressionController(model, total_steps=52).advance(22)  # stage 5 of 13 transitioning
    return model.train()


@pytest.mark.parametrize("rule", RULES)
def test_vision_bnn_inference_mode_and_two_forwards(rule):
    model = _resnet(rule)
    assert any(b.mask.is_transitioning for m in stompp_modules(model).values() for b in m.binarizers()) == (
        rule != "ste"
    )
    images = [torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    reference = copy.deepcopy(model)
    for mode in ("train", "eval"):
        model.train(mode == "train"), reference.train(mode == "train")
        for x in images:
            with torch.inference_mode():
                got = model(x.clone())
            assert torch.equal(got, reference(x.clone().requires_grad_(True)).detach()), mode
    # two forwards, one backward, against one at a time from the same state
    model.train()
    together = copy.deepcopy(model)
    for i, x in enumerate(images):
        _loss(model, x, seed=i).backward()
    sum(_loss(together, x, seed=i) for i, x in enumerate(images)).backward()
    for (name, p), q in zip(model.named_parameters(), together.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(model.named_buffers(), together.buffers()):
        assert torch.equal(b, c), name


# ---------------------------------------------------------------------------------------------------------------
# the real packaged all-MiniLM-L6-v2, mid-progression, as sentence-transformers uses it

SENTENCES = [
    "A quiet, moving film about growing old.",
    "The plot collapses halfway through.",
    "Sharp writing and a terrific cast.",
    "I checked my watch every ten minutes.",
]
PARAPHRASES = [
    "A gentle and touching movie about ageing.",
    "Halfway in, the story falls apart.",
    "Clever dialogue, great actors.",
    "It was so boring I kept looking at the time.",
]


def _minilm(compensation=None, clip=1.0):
    from transformers import AutoModel, AutoTokenizer

    from stompp_hf.assets import minilm_path

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(
        minilm_path(),
        num_hidden_layers=3,
        quantization_config=StoMPPConfig(activation_clip=clip, compensation=compensation, refresh_rate=1),
    )
    # 3 stages (one per encoder layer) over 9 steps: at step 4 stage 0 is frozen, stage 1 transitioning, stage 2
    # continuous
    ProgressionController(model, total_steps=9).advance(4)
    states = {
        "frozen" if b.frozen else "mid" if b.mask.is_transitioning else "continuous"
        for m in stompp_modules(model).values()
        for b in m.binarizers()
    }
    assert states == {"frozen", "mid", "continuous"}
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return model, tokenizer


def _encode(model, batch):
    """sentence-transformers' pipeline: mean pooling over the tokens."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_encode_under_inference_mode():
    model, tokenizer = _minilm(clip=3.0)  # a clip with which a pretrained transformer keeps its function
    model.train()  # measure beta on one batch, as training would
    with torch.no_grad():
        _encode(model, tokenizer(PARAPHRASES, padding=True, return_tensors="pt"))
    model.eval()
    with torch.inference_mode():  # what `SentenceTransformer.encode` does
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        got = _encode(model, batch)
    with torch.no_grad():
        no_grad = _encode(model, tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    grad = _encode(model, tokenizer(SENTENCES, padding=True, return_tensors="pt")).detach()
    assert torch.equal(got, no_grad) and torch.equal(got, grad)


@pytest.mark.parametrize("compensation", [None, "surge"])
def test_minilm_two_forward_contrastive_step(compensation):
    """A MultipleNegativesRankingLoss-style step (anchors and positives encoded by two forwards, one backward), and
    two separable losses against the same forwards backpropagated one at a time."""
    model, tokenizer = _minilm(compensation)
    model.train()
    anchors = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    positives = tokenizer(PARAPHRASES, padding=True, return_tensors="pt")
    together = copy.deepcopy(model)

    # contrastive: the two forwards meet in one loss
    contrastive = copy.deepcopy(model)
    torch.manual_seed(1)
    a, p = _encode(contrastive, anchors), _encode(contrastive, positives)
    scores = 20 * nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(p, dim=-1).T
    nn.functional.cross_entropy(scores, torch.arange(len(SENTENCES))).backward()
    grads = {n: q.grad for n, q in contrastive.named_parameters() if q.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    # the transitioning and the continuous layers get gradients (the pooler is not part of the embedding)
    assert any(".layer.1." in n for n in grads) and any(".layer.2." in n for n in grads)

    # separable: exactly the gradients of the forwards backpropagated one at a time (dropout included: the same
    # random draws in the same order, since a backward draws none)
    torch.manual_seed(1)
    for i, batch in enumerate((anchors, positives)):
        _loss(lambda b: _encode(model, b), batch, seed=i).backward()
    torch.manual_seed(1)
    pairs = enumerate((anchors, positives))
    sum(_loss(lambda b: _encode(together, b), batch, seed=i) for i, batch in pairs).backward()
    for (name, q), r in zip(model.named_parameters(), together.parameters()):
        assert (q.grad is None) == (r.grad is None), name
        if q.grad is not None:
            assert torch.equal(r.grad, q.grad), name
    for (name, b), c, d in zip(model.named_buffers(), together.buffers(), contrastive.buffers()):
        assert torch.equal(b, c) and torch.equal(b, d), name  # the same beta updates in the same order
