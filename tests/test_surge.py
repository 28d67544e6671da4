"""SURGE (`compensation="surge"`): exact forward, hand-computed gradients, the scaler, training and export."""

import math

import pytest
import torch
from torch import nn

from stompp_hf import ProgressionController, StoMPPConfig, prepare_model
from stompp_hf.core.surge import SURGE_EPS, surge
from stompp_hf.export import pack_model, packed_state_dict
from stompp_hf.nn import StoMPPConv2d, StoMPPLinear

X = [[0.5, -2.0]]
W = [[0.3, -0.2]]


def linear_layer(compensation, eta=0.5, rule="ste"):
    config = StoMPPConfig(
        weights=rule,
        activations=rule,
        weight_scale="none",
        activation_scale="none",
        compensation=compensation,
        surge_eta=eta,
    )
    base = nn.Linear(2, 1)
    with torch.no_grad():
        base.weight.copy_(torch.tensor(W))
        base.bias.fill_(0.25)
    return StoMPPLinear.from_module(base, config)


def test_hand_computed_gradients():
    """x = [0.5, -2], W = W_a = [0.3, -0.2], STE, no scales, loss = output.

    Binary branch: sign(x) = [1, -1], sign(W) = [1, -1], out = 2 + 0.25.
    g_b  = sign(W) * 1{|x| <= 1}            = [1, 0]
    g_a  = W_a                              = [0.3, -0.2]
    lam  = 0.5 * ||g_b|| / (||g_a|| + eps)  = 0.5 / sqrt(0.13)
    dx   = g_b + lam * g_a;  dW_a = lam * x;  dW (latent, BinaryConnect STE) = sign(x) = [1, -1]
    """
    layer = linear_layer("surge").train()
    x = torch.tensor(X, requires_grad=True)
    out = layer(x)
    assert out.item() == 2.25
    out.sum().backward()
    lam = 0.5 * 1.0 / (math.sqrt(0.13) + SURGE_EPS)
    torch.testing.assert_close(layer.surge_lambda, torch.tensor(lam), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, torch.tensor([[1 + lam * 0.3, -0.2 * lam]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.surge_weight.grad, torch.tensor([[0.5 * lam, -2.0 * lam]]), rtol=1e-6, atol=0)
    assert torch.equal(layer.weight.grad, torch.tensor([[1.0, -1.0]]))
    assert layer.bias.grad.item() == 1.0


def test_auxiliary_branch_runs_under_the_forward_autocast():
    """Under CPU bf16 autocast a layer's input is bfloat16 (the previous layer's output) while the auxiliary weight
    is float32. The auxiliary forward runs in the backward pass, where autocast is off, so it must re-enter the
    forward's autocast state: the hand-computed case of `test_hand_computed_gradients`, in bfloat16."""
    layer = linear_layer("surge").train()
    x = torch.tensor(X, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.item() == 2.25
    out.float().sum().backward()
    lam = 0.5 * 1.0 / (math.sqrt(0.13) + SURGE_EPS)
    torch.testing.assert_close(layer.surge_lambda, torch.tensor(lam), rtol=1e-2, atol=0)
    assert x.grad.dtype == torch.bfloat16 and layer.surge_weight.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.float(), torch.tensor([[1 + lam * 0.3, -0.2 * lam]]), rtol=1e-2, atol=0)
    torch.testing.assert_close(layer.surge_weight.grad, torch.tensor([[0.5 * lam, -2.0 * lam]]), rtol=1e-2, atol=0)


def test_input_gradient_is_ste_plus_scaled_auxiliary_gradient():
    """On random data: dx(SURGE) = dx(STE) + lam * dx(auxiliary branch alone), lam by the formula, eta scaling."""
    torch.manual_seed(0)
    for eta in (0.1, 2.0):
        layer = linear_layer("surge", eta=eta).train()
        plain = linear_layer(None).train()
        with torch.no_grad():
            layer.weight.normal_()
            layer.surge_weight.normal_()
            plain.weight.copy_(layer.weight)
        x = torch.randn(4, 2, requires_grad=True)
        x0 = x.detach().clone().requires_grad_(True)
        xa = x.detach().clone().requires_grad_(True)
        g = torch.randn(4, 1)
        out = layer(x)
        out.backward(g)
        plain(x0).backward(g)
        nn.functional.linear(xa, layer.surge_weight.detach()).backward(g)
        lam = eta * x0.grad.norm() / (xa.grad.norm() + SURGE_EPS)
        torch.testing.assert_close(layer.surge_lambda, lam)
        torch.testing.assert_close(x.grad, x0.grad + lam * xa.grad)
        assert torch.equal(layer.weight.grad, plain.weight.grad)  # the latent weight keeps its STE gradient


@pytest.mark.parametrize("rule", ["ste", "stompp_ste", "stompp"])
def test_output_is_exactly_the_binary_branch(rule):
    torch.manual_seed(1)
    config = dict(weights=rule, activations=rule, weight_scale="channel", activation_scale="tensor")
    conv = nn.Conv2d(3, 4, 3, padding=1)
    a = StoMPPConv2d.from_module(conv, StoMPPConfig(**config, compensation="surge")).train()
    b = StoMPPConv2d.from_module(conv, StoMPPConfig(**config)).train()
    for m in (a, b):  # a half-frozen mask for the progressive rules
        for binarizer in m.binarizers():
            binarizer.controlled = True
    x = torch.randn(2, 3, 5, 5)
    a(x), b(x)  # sizes the input masks, sets beta
    for m in (a, b):
        gen = torch.Generator().manual_seed(3)
        for binarizer in m.binarizers():
            if binarizer.rule != "ste":
                binarizer.mask.value = torch.rand(binarizer.mask.shape, generator=gen) < 0.5
    out_a, out_b = a(x.requires_grad_(True)), b(x)
    assert torch.equal(out_a, out_b)
    out_a.sum().backward()
    assert a.surge_lambda is not None and a.surge_weight.grad is not None
    a.eval()
    assert torch.equal(a(x), b.eval()(x))


def test_surge_costs_nothing_outside_training():
    layer = linear_layer("surge").eval()
    x = torch.tensor(X, requires_grad=True)
    layer(x).sum().backward()
    assert layer.surge_lambda is None and layer.surge_weight.grad is None
    with torch.no_grad():
        layer.train()(x)
    assert layer.surge_lambda is None


def test_surge_function_without_output_gradient_path():
    x = torch.randn(3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    out = surge(x, w, lambda xb: xb.detach() * 2, lambda xa, wa: xa * wa, eta=1.0)
    assert not out.requires_grad  # binary branch cut the graph: nothing to compensate


def _tiny_model(config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    return prepare_model(model, config)


def test_training_makes_aux_weights_learn_and_export_drops_them():
    config = StoMPPConfig(weights="stompp_ste", activations="stompp_ste", compensation="surge")
    model = _tiny_model(config)
    aux = {n: p for n, p in model.named_parameters() if n.endswith("surge_weight")}
    assert sorted(aux) == ["2.surge_weight", "4.surge_weight"]  # first and last layer stay full precision
    for name, p in aux.items():
        assert torch.equal(p, model.get_submodule(name.rsplit(".", 1)[0]).weight)  # initialised from the latent
    before = {n: p.detach().clone() for n, p in aux.items()}
    controller = ProgressionController(model, total_steps=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    for step in range(1, 8):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        controller.advance(step)
    assert all(not torch.equal(before[n], p) for n, p in aux.items())
    assert "stompp/surge_lambda" in controller.stats() and controller.stats()["stompp/surge_lambda"] > 0
    model.eval()
    reference = model(x)
    state = packed_state_dict(model)
    assert not any("surge" in k for k in state)
    pack_model(model)
    assert not any("surge" in n for n, _ in model.named_parameters())
    assert torch.equal(model(x), reference)
