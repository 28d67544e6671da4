"""Fast paths of the training modules give what the reference path gives.

A fully frozen layer computes `op(sign(x), sign(W)) * (beta * alpha) + b` (the scales moved to the output, the form
of the packed modules and the XNOR kernel) and keeps its +-1 operands for the backward pass as bool; the reference
is `op(beta * sign(x), alpha * sign(W), b)` through `masked_binarize`, with the same straight-through gradients.
"""

import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification

from stompp_hf import (
    BinaryLinear,
    ProgressionController,
    StoMPPConfig,
    StoMPPLinear,
    masked_binarize,
    prepare_model,
    set_kernel,
    stompp_modules,
)
from stompp_hf.kernels import KERNELS, xnor

from .testing_utils import COMBOS, LAYERS, frozen_training_module, tiny_bert_config, with_zeros


def reference_forward(module, x):
    """The unfactored forward: each tensor binarized with its scale by `masked_binarize`, then the plain op."""
    op = nn.functional.linear if isinstance(module, StoMPPLinear) else module._conv_forward
    return op(module.binarized_input(x), module.binarized_weight(), module.bias)


def grads(module, x, forward):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = forward(module, x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    return out.detach(), [None if t.grad is None else t.grad.clone() for t in (x, module.weight, module.bias)]


@pytest.mark.parametrize("scales", [True, False], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("weights,activations", COMBOS, ids=[f"W{w}-A{a}" for w, a in COMBOS])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_frozen_layer_matches_reference_values_and_gradients(kind, weights, activations, scales):
    module, _, shape = frozen_training_module(kind, weights, activations, scales)
    x = with_zeros(shape, seed=3)
    out, got = grads(module, x, lambda m, t: m(t))
    ref_out, expected = grads(module, x, reference_forward)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, e in zip(got, expected):
        if e is None or not e.any():  # 'stompp' tensors are constants: no gradient on either path
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)  # float reassociation only


def test_frozen_ste_gradients_hand_computed():
    """x = [0.5, -2], W = [0.3, -0.2], beta = 0.5, alpha = mean|W| = 0.25, loss = y.

    y = (sign(x) . sign(W)) * beta * alpha = 2 * 0.125 = 0.25. The STE gradients are taken with respect to
    beta * sign(x) and alpha * sign(W): dx = alpha * sign(W) * 1{|x| <= beta} = [0.25, 0] and
    dW = beta * sign(x) (BinaryConnect: the identity STE) = [0.5, -0.5]; the bias gets 1.
    """
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.2]]))
        layer.bias.zero_()
    module = StoMPPLinear.from_module(layer, StoMPPConfig(weights="ste", activations="ste"))
    module.input_binarizer.scale.fill_(0.5)
    module.eval()
    x = torch.tensor([[0.5, -2.0]], requires_grad=True)
    y = module(x)
    assert y.item() == 0.25
    y.sum().backward()
    assert x.grad.tolist() == [[0.25, 0.0]]
    assert module.weight.grad.tolist() == [[0.5, -0.5]]
    assert module.bias.grad.tolist() == [1.0]


def test_zero_weight_row_gets_no_gradient_instead_of_nan():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[0] = 0.0  # alpha = 0 for this row
    module = StoMPPLinear.from_module(layer, StoMPPConfig(weights="ste", activations=None))
    module(torch.randn(4, 3)).sum().backward()
    assert torch.isfinite(module.weight.grad).all()
    assert not module.weight.grad[0].any() and module.weight.grad[1].any()


def saved_copies(fn, *owned: torch.Tensor, min_numel: int = 1) -> list[tuple[int, ...]]:
    """Shapes of the floating-point tensors of at least `min_numel` entries that autograd keeps for the backward
    while running `fn` and that are new storage: not `owned` (the layer input, the weight) or views of them."""
    storages = {t.untyped_storage().data_ptr() for t in owned}
    copies = []

    def pack(t):
        if t.is_floating_point() and t.numel() >= min_numel and t.untyped_storage().data_ptr() not in storages:
            copies.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return copies


STATES = {
    "STE": ("ste", "ste", True),
    "StoMPP+STE frozen": ("stompp_ste", "stompp_ste", True),
    "StoMPP frozen": ("stompp", "stompp", True),
    "StoMPP continuous": ("stompp", "stompp", False),
    "W ste, A stompp continuous": ("ste", "stompp", False),
}


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_keeps_no_copy_of_its_binarized_operands(kind, state):
    """The op's binarized operands are recomputed in the backward from the input and the weight, so a layer keeps
    what a full-precision layer keeps: its input and weight (plus per-channel scales), whatever the rule."""
    weights, activations, frozen = STATES[state]
    module, _, shape = frozen_training_module(kind, weights, activations, True)
    for b in module.binarizers():
        if b.rule != "ste":
            b.mask.fill(frozen)
    x = with_zeros(shape, seed=3).requires_grad_(True)
    min_numel = module.weight.shape[0] + 1  # larger than a per-channel scale
    assert saved_copies(lambda: module(x), x, module.weight, min_numel=min_numel) == []
    # the check does see a copy: a plain linear / conv on clamp(x) keeps the clamped input
    op = nn.functional.linear if kind == "linear" else module._conv_forward
    fp = lambda: op(torch.clamp(x, -0.5, 0.5), module.weight, None)  # noqa: E731
    assert tuple(x.shape) in saved_copies(fp, x, module.weight, min_numel=min_numel)
    # and the gradients are the reference path's
    _, got = grads(module, x.detach(), lambda m, t: m(t))
    _, expected = grads(module, x.detach(), reference_forward)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "continuous"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant, frozen):
    """Continuous: the query, key and value projections share their input's clip (`_SharedClip`), also in the
    forward that checkpointing runs again inside the backward."""
    torch.manual_seed(0)
    fp = BertForSequenceClassification(tiny_bert_config())
    models = []
    for checkpointing in (False, True):
        model = BertForSequenceClassification(tiny_bert_config())
        model.load_state_dict(fp.state_dict())

        prepare_model(model, StoMPPConfig(weights="ste", activations="stompp_ste"))
        for m in stompp_modules(model).values():
            for b in m.binarizers():
                b.controlled = True
                if b.mask is not None:
                    b.mask.fill(frozen)
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
        model.train()
        models.append(model)
    ids = torch.randint(5, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    for model in models:
        torch.manual_seed(3)  # same dropout masks
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    plain, checkpointed = (dict(m.named_parameters()) for m in models)
    for name, p in plain.items():
        if p.grad is not None:
            torch.testing.assert_close(checkpointed[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_masked_binarize_keeps_no_float_copy_for_backward():
    u = torch.randn(64, requires_grad=True)
    mask = torch.rand(64) < 0.5
    out = lambda: masked_binarize(u, mask, rule="stompp_ste", scale=0.7, bound=0.7, clip_smooth=True)  # noqa: E731
    assert saved_copies(out, u, min_numel=2) == []


# ---------------------------------------------------------------------------------------------------------------
# packed inference: every kernel gives the reference path's outputs bit for bit

needs_xnor = pytest.mark.skipif(not xnor.is_available(), reason="the XNOR kernel could not be built here")


@needs_xnor
@pytest.mark.parametrize("scales", [True, False], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("weights,activations", COMBOS, ids=[f"W{w}-A{a}" for w, a in COMBOS])
def test_packed_linear_kernels_are_bit_identical(weights, activations, scales):
    module, _, shape = frozen_training_module("linear", weights, activations, scales)
    packed = BinaryLinear.from_stompp(module)
    x = with_zeros((3, *shape), seed=5)
    with torch.no_grad():
        expected = module(x)
        outputs = {}
        for kernel in KERNELS:
            packed.kernel = kernel
            if kernel == "xnor" and None in (weights, activations):
                with pytest.raises(ValueError, match="does not binarize both"):
                    packed(x)
                continue
            outputs[kernel] = packed(x)
    for kernel, out in outputs.items():
        assert torch.equal(out, expected), kernel


@needs_xnor
@pytest.mark.parametrize("weight_scale,input_scale", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_kernels_with_either_scale(weight_scale, input_scale, bias):
    torch.manual_seed(0)
    layer = BinaryLinear(70, 9, bias=bias, weight_scale=weight_scale, input_scale=input_scale)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(0, 256, layer.weight.shape, dtype=torch.uint8))
        layer.weight[:, -1] &= 0x3F  # 70 = 8 * 8 + 6: padding bits stay zero
        for t in (layer.weight_scale, layer.input_scale, layer.bias):
            if t is not None:
                t.uniform_(0.1, 2.0)
    x = with_zeros((2, 5, 70), seed=9)
    with torch.no_grad():
        outputs = {}
        for kernel in KERNELS:
            layer.kernel = kernel
            outputs[kernel] = layer(x)
    assert all(torch.equal(out, outputs["reference"]) for out in outputs.values())


@needs_xnor
def test_auto_kernel_falls_back_where_xnor_cannot_run():
    module, _, shape = frozen_training_module("linear", "ste", "ste", True)
    packed = BinaryLinear.from_stompp(module)
    x = with_zeros(shape, seed=5)
    with torch.no_grad():
        expected = packed(x)
    # autograd on the input (e.g. LoRA adapters upstream): "auto" takes the differentiable reference path ...
    xg = x.clone().requires_grad_(True)
    out = packed(xg)
    assert out.requires_grad and torch.equal(out.detach(), expected)
    out.sum().backward()
    assert xg.grad is not None
    # ... and "xnor" says why it cannot run
    packed.kernel = "xnor"
    with pytest.raises(ValueError, match="no backward"):
        packed(xg)
    with pytest.raises(ValueError, match="float32"), torch.no_grad():
        packed(x.double())


def test_set_kernel_validates_and_counts():
    model = nn.Sequential(BinaryLinear(8, 4), nn.ReLU(), BinaryLinear(4, 2))
    assert set_kernel(model, "reference") == 2
    assert all(m.kernel == "reference" for m in model if isinstance(m, BinaryLinear))
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        set_kernel(model, "fast")


def test_torch_compile_matches_eager_without_graph_breaks():
    """`torch.compile` traces the StoMPP layers (masked binarize, frozen fast path, STE) in one graph per forward
    and trains to the same losses and gradients as eager mode (AOT autograd, no C++ compiler needed)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    pair = []
    for _ in range(2):
        torch.manual_seed(0)
        model = BertForSequenceClassification(
            tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        )
        prepare_model(model, StoMPPConfig(weights="stompp_ste", activations="stompp_ste"))
        controller = ProgressionController(model, 100)
        model.train()
        pair.append((model, controller))
    ids = torch.randint(5, 60, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])
    for model, controller in pair:
        model(input_ids=ids)  # sizes the input masks
        controller.restore(60)  # stage 0 frozen, later stages mid-transition or continuous
    eager, compiled = pair[0][0], torch.compile(pair[1][0], backend="aot_eager")
    for step in range(2):
        losses = []
        for model, (_, controller) in zip((eager, compiled), pair):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            losses.append(loss.detach())
            controller.advance(61 + step)
        torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(pair[0][0].named_parameters(), pair[1][0].parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch._dynamo.utils.counters["graph_break"]


def test_inplace_change_of_the_input_after_the_layer_raises_like_autograd():
    """The recomputed operand is guarded like a saved tensor: an inplace change of the layer input before the
    backward raises instead of silently giving wrong gradients (a 'stompp' frozen input has no other guard). A
    frozen linear layer's node (`core.factored`) saves the input itself, so autograd's own check raises there."""
    for kind, message in (("linear", "modified by an inplace operation"), ("conv", "cannot recompute the binarized")):
        module, _, shape = frozen_training_module(kind, "stompp_ste", "stompp", True)
        x = with_zeros(shape, seed=3).requires_grad_(True)
        h = x * 1.0
        out = module(h)
        h.mul_(-1.0)
        with pytest.raises(RuntimeError, match=message):
            out.sum().backward()
