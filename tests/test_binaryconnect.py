"""BinaryConnect for weights, BinaryNet for inputs (docs/design.md "Core", Eq. 1-3).

A weight's straight-through gradient is the identity `g` (rule 'ste', and the frozen entries of 'stompp_ste'),
whatever `|w|`, and the latent weights it trains are clipped to [-1, 1] after every optimizer step
(`ProgressionController.clip_latent_weights`). An input's straight-through gradient stays the clipped identity
`1{|x| <= c} * g`.
"""

import pytest
import torch
from torch import nn

from stompp_hf import ProgressionController, StoMPPConfig, StoMPPLinear, masked_binarize, prepare_model, stompp_modules

U = torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.5, -0.75])
MASK = torch.tensor([True, False, True, False, True, True])
G = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def grad_of(rule, clip_smooth, mask=MASK, scale=1.0, bound=1.0):
    u = U.clone().requires_grad_(True)
    out = masked_binarize(u, mask, rule=rule, scale=scale, bound=bound, clip_smooth=clip_smooth)
    if not out.requires_grad:
        return out, torch.zeros_like(U)
    out.backward(G)
    return out.detach(), u.grad


# --------------------------------------------------------------------------------------------- the weight STE


@pytest.mark.parametrize("mask", [MASK, True, False, torch.ones(6, dtype=torch.bool)], ids=["mixed", "T", "F", "ones"])
def test_plain_ste_weight_gradient_is_the_identity(mask):
    out, grad = grad_of("ste", clip_smooth=False, mask=mask)
    assert torch.equal(out, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, -1.0]))
    # BinaryConnect: g itself, the entries |w| > 1 (-2 and 1.5) included
    assert torch.equal(grad, G)


def test_stompp_ste_weight_gradient_is_the_identity_on_frozen_and_continuous_entries():
    out, grad = grad_of("stompp_ste", clip_smooth=False)
    # frozen -> sign, continuous -> the identity (unclipped)
    assert torch.equal(out, torch.tensor([-1.0, -0.5, 1.0, 0.25, 1.0, -1.0]))
    # frozen entries: identity STE (u=-2 -> 1, u=1.5 -> 5 now get gradient); continuous: identity smooth path
    assert torch.equal(grad, G)
    for constant in (True, False):
        _, fast = grad_of("stompp_ste", clip_smooth=False, mask=constant)
        _, full = grad_of("stompp_ste", clip_smooth=False, mask=torch.full((6,), constant))
        assert torch.equal(fast, G) and torch.equal(full, G)


def test_stompp_weight_frozen_entries_still_get_no_gradient():
    _, grad = grad_of("stompp", clip_smooth=False)
    assert torch.equal(grad, torch.tensor([0.0, 2.0, 0.0, 4.0, 0.0, 0.0]))


def test_weight_bound_is_ignored():
    """The clip bound is an input notion: a weight's STE is the identity whatever bound is passed."""
    for bound in (0.1, 1.0, 100.0):
        _, grad = grad_of("ste", clip_smooth=False, bound=bound)
        assert torch.equal(grad, G)
        _, grad = grad_of("stompp_ste", clip_smooth=False, bound=bound)
        assert torch.equal(grad, G)


# ---------------------------------------------------------------------------------------------- the input STE


def test_input_ste_keeps_the_clipped_window():
    out, grad = grad_of("ste", clip_smooth=True)
    assert torch.equal(out, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, -1.0]))
    # BinaryNet: g * 1{|x| <= 1}: x=-2 and x=1.5 get none
    assert torch.equal(grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 6.0]))
    _, grad = grad_of("stompp_ste", clip_smooth=True)
    assert torch.equal(grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 6.0]))


def test_layer_input_beyond_the_clip_gets_zero_gradient_under_ste():
    """x = [0.5, -2, 0.9], W = [[0.3, -0.2, 0.1]], no scales, loss = y: dx = sign(W) * 1{|x| <= 1} = [1, 0, 1],
    dW = sign(x) = [1, -1, 1] (the identity STE w.r.t. sign(W))."""
    layer = nn.Linear(3, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]]))
        layer.bias.zero_()
    cfg = StoMPPConfig(weights="ste", activations="ste", weight_scale="none", activation_scale="none")
    module = StoMPPLinear.from_module(layer, cfg)
    x = torch.tensor([[0.5, -2.0, 0.9]], requires_grad=True)
    y = module(x)
    assert y.item() == 3.0  # sign(x) . sign(W) = 1 + 1 + 1
    y.sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 1.0]]
    assert module.weight.grad.tolist() == [[1.0, -1.0, 1.0]]


# ------------------------------------------------------------------------------------- in the training modules


def channel_scaled_layer(rule, weight):
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.zero_()
    cfg = StoMPPConfig(weights=rule, activations=None, weight_scale="channel")
    module = StoMPPLinear.from_module(layer, cfg)
    module.weight_binarizer.controlled = True  # the test sets the masks by hand
    return module


W_CHANNEL = [[1.5, -0.5], [0.2, 0.0], [0.0, 0.0]]  # alpha = mean|W| per row = [1.0, 0.1, 0.0]
X = [[0.5, -2.0]]
GY = [[1.0, 3.0, 5.0]]
# dL/dW = the gradient w.r.t. alpha * sign(W) = gy_o * x_k (identity STE); a zero alpha passes none
DW = [[0.5, -2.0], [1.5, -6.0], [0.0, 0.0]]


@pytest.mark.parametrize("rule", ["ste", "stompp_ste"])
def test_frozen_weight_gradient_with_channel_scale_is_the_identity_divided_back_by_alpha(rule):
    module = channel_scaled_layer(rule, W_CHANNEL)
    module.weight_binarizer.mask.fill(True)  # a frozen stage ('ste' is frozen anyway)
    assert module.weight_binarizer.frozen  # the factored path: y = (x . sign(W)) * alpha + b
    x = torch.tensor(X)
    y = module(x)
    # sign(W) = [[1, -1], [1, 1], [1, 1]]: y = [0.5 + 2, 0.5 - 2, 0.5 - 2] * alpha
    torch.testing.assert_close(y, torch.tensor([[2.5, -0.15, 0.0]]), rtol=1e-6, atol=0)
    y.backward(torch.tensor(GY))
    torch.testing.assert_close(module.weight.grad, torch.tensor(DW), rtol=1e-6, atol=0)
    assert module.weight.grad[0, 0] != 0  # |w| = 1.5 > 1 gets gradient under BinaryConnect
    # the unfactored reference (alpha * sign(W) through masked_binarize) gives the same gradient where alpha > 0
    # (unfactored, the all-zero row's gradient w.r.t. 0 * sign(W) is g itself: only the factored form drops it)
    module.weight.grad = None
    nn.functional.linear(x, module.binarized_weight(), module.bias).backward(torch.tensor(GY))
    torch.testing.assert_close(module.weight.grad[:2], torch.tensor(DW[:2]), rtol=1e-6, atol=0)


def test_transitioning_stompp_ste_weight_gets_the_identity_everywhere():
    module = channel_scaled_layer("stompp_ste", W_CHANNEL)
    module.weight_binarizer.mask.value = torch.tensor([[True, False], [False, True], [True, True]])
    x = torch.tensor(X)
    y = module(x)
    # W' = [[alpha0 * 1, -0.5], [0.2, alpha1 * 1], [0, 0]] = [[1, -0.5], [0.2, 0.1], [0, 0]]
    torch.testing.assert_close(y, torch.tensor([[1.5, -0.1, 0.0]]), rtol=1e-6, atol=0)
    y.backward(torch.tensor(GY))
    torch.testing.assert_close(module.weight.grad, torch.tensor([[0.5, -2.0], [1.5, -6.0], [2.5, -10.0]]))


# ----------------------------------------------------------------------------------- latent weight clipping


def tiny_model(rule, **overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    cfg = dict(
        weights=rule,
        activations=rule,
        weight_scale="none",
        activation_scale="none",
        modules_to_not_convert=[],
        refresh_rate=1,
    )
    cfg.update(overrides)
    return prepare_model(model, StoMPPConfig(**cfg))


def latent_weights(model):
    return [m.weight for m in stompp_modules(model).values()]


def test_conversion_of_a_plain_sequential_converts_every_linear():
    model = tiny_model("ste")
    modules = stompp_modules(model)
    assert list(modules) == ["0", "2"]
    assert all(m.weight_binarizer.rule == "ste" and m.input_binarizer.rule == "ste" for m in modules.values())


def test_ste_latent_weights_stay_in_the_unit_interval_under_a_huge_learning_rate():
    model = tiny_model("ste")
    controller = ProgressionController(model, total_steps=10)
    opt = torch.optim.SGD(model.parameters(), lr=1e3)
    gen = torch.Generator().manual_seed(1)
    saturated = False
    for step in range(1, 5):
        x = torch.randn(16, 4, generator=gen)
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
        grown = max(w.detach().abs().max().item() for w in latent_weights(model))
        saturated |= grown > 1.0  # without the clip a weight would leave [-1, 1] here
        controller.advance(step)
        for w in latent_weights(model):
            assert w.detach().abs().max().item() <= 1.0
    assert saturated
    assert any((w.detach().abs() == 1.0).any() for w in latent_weights(model))
    # the biases and full-precision parameters are not latent binary weights: not clipped
    assert max(m.bias.detach().abs().max().item() for m in stompp_modules(model).values()) > 1.0


def set_weights(model, value):
    with torch.no_grad():
        for w in latent_weights(model):
            w.copy_(torch.linspace(-value, value, w.numel()).view_as(w))
    return [w.detach().clone() for w in latent_weights(model)]


def test_stompp_ste_clips_only_the_frozen_entries():
    model = tiny_model("stompp_ste")
    controller = ProgressionController(model, total_steps=10)  # two stages of 5 steps
    before = set_weights(model, 3.0)
    first, second = stompp_modules(model).values()
    # stage 0 transitioning with a partial mask, stage 1 continuous
    mask = torch.zeros(first.weight.shape, dtype=torch.bool)
    mask[::2] = True
    first.weight_binarizer.mask.value = mask.clone()
    second.weight_binarizer.mask.fill(False)
    controller.clip_latent_weights()
    expected = torch.where(mask, before[0].clamp(-1, 1), before[0])
    assert torch.equal(first.weight.detach(), expected)
    assert first.weight.detach()[~mask].abs().max() > 1  # continuous entries keep |w| > 1
    assert torch.equal(second.weight.detach(), before[1])
    # a frozen stage: every entry clipped
    second.weight_binarizer.mask.fill(True)
    controller.clip_latent_weights()
    assert torch.equal(second.weight.detach(), before[1].clamp(-1, 1))


def test_advance_clips_under_the_masks_the_step_was_taken_with():
    model = tiny_model("stompp_ste")
    controller = ProgressionController(model, total_steps=10)
    for step in range(1, 6):  # to the end of stage 0
        controller.advance(step)
    first, second = stompp_modules(model).values()
    assert first.weight_binarizer.mask.value is True and second.weight_binarizer.mask.value is False
    before = set_weights(model, 3.0)
    controller.advance(6)  # stage 1 starts transitioning only now: its weight is clipped with its old (False) mask
    assert torch.equal(first.weight.detach(), before[0].clamp(-1, 1))
    assert torch.equal(second.weight.detach(), before[1])


def test_stompp_never_clips():
    model = tiny_model("stompp")
    controller = ProgressionController(model, total_steps=8)
    for step in range(1, 9):
        before = set_weights(model, 3.0)
        controller.advance(step)
        assert all(torch.equal(w.detach(), b) for w, b in zip(latent_weights(model), before))
    assert all(m.weight_binarizer.mask.value is True for m in stompp_modules(model).values())
    before = set_weights(model, 3.0)
    controller.clip_latent_weights()
    assert all(torch.equal(w.detach(), b) for w, b in zip(latent_weights(model), before))


def test_restore_does_not_clip():
    model = tiny_model("ste")
    controller = ProgressionController(model, total_steps=10)
    before = set_weights(model, 3.0)
    controller.restore(7)
    assert controller.step == 7
    assert all(torch.equal(w.detach(), b) for w, b in zip(latent_weights(model), before))


def test_channel_scale_clips_in_the_latents_own_units():
    model = tiny_model("ste", weight_scale="channel")
    controller = ProgressionController(model, total_steps=10)
    small = set_weights(model, 0.05)  # pretrained-transformer magnitudes: a no-op
    controller.clip_latent_weights()
    assert all(torch.equal(w.detach(), b) for w, b in zip(latent_weights(model), small))
    big = set_weights(model, 3.0)
    controller.clip_latent_weights()
    assert all(torch.equal(w.detach(), b.clamp(-1, 1)) for w, b in zip(latent_weights(model), big))


def test_surge_weight_is_not_clipped():
    model = tiny_model("ste", compensation="surge")
    controller = ProgressionController(model, total_steps=10)
    set_weights(model, 3.0)
    with torch.no_grad():
        for m in stompp_modules(model).values():
            m.surge_weight.fill_(5.0)
    controller.clip_latent_weights()
    for m in stompp_modules(model).values():
        assert m.weight.detach().abs().max() == 1.0
        assert torch.equal(m.surge_weight.detach(), torch.full_like(m.surge_weight, 5.0))


def test_sharded_dtensor_weights_clip_their_local_shard():
    """Rank 1 of 2 (a fake process group, no communication): each weight is a `DTensor` sharded on dim 0 (rows 4..7
    of the first layer's 8); a transitioning mask is sliced to this rank's rows."""
    dist = pytest.importorskip("torch.distributed")
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=1, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        model = tiny_model("stompp_ste")
        controller = ProgressionController(model, total_steps=10)
        first, second = stompp_modules(model).values()
        full = set_weights(model, 3.0)
        for module, weight in ((first, full[0]), (second, full[1])):
            local = weight.chunk(2)[1].clone()  # FSDP2's Shard(0) layout: rows 4..7 of [8, 4], row 2 of [3, 8]
            module.weight = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False))
        mask = torch.zeros(first.weight.shape, dtype=torch.bool)  # [8, 4]
        mask[:, 1] = True
        mask[5] = True
        first.weight_binarizer.mask.value = mask
        second.weight_binarizer.mask.fill(True)
        controller.clip_latent_weights()
        shard = first.weight.to_local().detach()
        assert torch.equal(shard, torch.where(mask[4:], full[0][4:].clamp(-1, 1), full[0][4:]))
        assert torch.equal(second.weight.to_local().detach(), full[1][2:].clamp(-1, 1))
    finally:
        dist.destroy_process_group()
