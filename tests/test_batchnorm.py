"""`recalibrate_batchnorm`: exact pooled BN statistics over the batches, and no other state touched."""

import pytest
import torch
from torch import nn

from stompp_hf import StoMPPConfig, prepare_model, stompp_modules
from stompp_hf.nn import Binarizer
from stompp_hf.progression import recalibrate_batchnorm

# batches of a [N, 1, 1, 2] image; the BN input is the 1x1 conv's output: channel 0 = x, channel 1 = 2x
B1 = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])
B2 = torch.tensor([[[[10.0, 20.0]]], [[[0.0, 5.0]]]])
# over both batches, channel 0 sees 1, 2, 3, 4, 10, 20, 0, 5: sum 45, sum of squares 555, so mean = 45 / 8 and
# unbiased var = (555 - 45^2 / 8) / 7 = 345 / 8; channel 1 (2x): 45 / 4 and 345 / 2. (Averaging the two batches'
# own statistics, as a cumulative moving average does, would give var (5 / 3 + 875 / 12) / 2 instead.)
POOLED_MEAN = [45 / 8, 45 / 4]
POOLED_VAR = [345 / 8, 345 / 2]
# batch 1 alone: 1, 2, 3, 4 -> mean 5 / 2, var 5 / 3
B1_MEAN, B1_VAR = [5 / 2, 5.0], [5 / 3, 20 / 3]


def tiny_conv_net():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    cfg = StoMPPConfig(
        weights="stompp_ste",
        activations="stompp_ste",
        weight_scale="channel",
        activation_scale="tensor",
        modules_to_not_convert=[],
    )
    tail = prepare_model(nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)), cfg)
    bn2 = nn.BatchNorm1d(3, momentum=0.3)
    model = nn.Sequential(conv, nn.BatchNorm2d(2), nn.Flatten(), tail, bn2)
    for m in stompp_modules(model).values():
        m.input_binarizer.scale.fill_(0.7)  # measured activation scales
        m.weight_binarizer.controlled = m.input_binarizer.controlled = True
    first = next(iter(stompp_modules(model).values()))
    first.weight_binarizer.mask.value = torch.rand(first.weight.shape) < 0.5  # a transitioning mask
    with torch.no_grad():
        model[1].running_mean.fill_(-3.0)
        model[1].running_var.fill_(9.0)
    return model


def non_bn_state(model):
    bn_buffers = {
        f"{n}.{b}"
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items() if k not in bn_buffers}
    state.update({f"param:{n}": p.detach().clone() for n, p in model.named_parameters()})
    masks = [b.mask.tensor().clone() for b in model.modules() if isinstance(b, Binarizer) and b.mask is not None]
    return state, masks


def assert_state_equal(a, b):
    (sa, ma), (sb, mb) = a, b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # bit-identical
    assert len(ma) == len(mb) and all(torch.equal(x, y) for x, y in zip(ma, mb))


def test_running_stats_are_the_exact_pooled_statistics_and_nothing_else_changes():
    model = tiny_conv_net()
    model.train()
    model[3][1].eval()  # mixed training modes are restored exactly
    modes = {n: m.training for n, m in model.named_modules()}
    before = non_bn_state(model)
    used = recalibrate_batchnorm(model, [B1, B2])
    assert used == 2
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, torch.tensor(POOLED_MEAN), rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.running_var, torch.tensor(POOLED_VAR), rtol=1e-6, atol=0)
    assert bn.num_batches_tracked.item() == 2
    assert bn.momentum == 0.1 and model[4].momentum == 0.3
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert_state_equal(non_bn_state(model), before)
    # the BN after the (binarized, eval-mode dropout) tail got statistics too, from the deterministic forward
    assert model[4].num_batches_tracked.item() == 2 and not torch.equal(model[4].running_var, torch.ones(3))


def test_second_bn_sees_the_eval_mode_network_so_the_call_is_deterministic():
    model = tiny_conv_net()
    recalibrate_batchnorm(model, [B1, B2])
    first = model[4].running_mean.clone(), model[4].running_var.clone()
    recalibrate_batchnorm(model, [B1, B2])  # dropout off: the same activations, the same statistics
    assert torch.equal(model[4].running_mean, first[0]) and torch.equal(model[4].running_var, first[1])


def test_max_batches_and_generators():
    model = tiny_conv_net()
    used = recalibrate_batchnorm(model, (b for b in [B1, B2, B2]), max_batches=1)
    assert used == 1
    torch.testing.assert_close(model[1].running_mean, torch.tensor(B1_MEAN), rtol=1e-6, atol=0)
    torch.testing.assert_close(model[1].running_var, torch.tensor(B1_VAR), rtol=1e-6, atol=0)
    assert model[1].num_batches_tracked.item() == 1


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_conv_net()

    def forward(self, pixel_values):
        return self.net(pixel_values)


def test_dict_batches_are_passed_as_keywords_without_labels():
    model = KeywordNet()
    batches = [
        {"pixel_values": B1, "labels": torch.tensor([0, 1])},
        {"pixel_values": B2, "labels": torch.tensor([1, 0])},
    ]
    assert recalibrate_batchnorm(model, batches) == 2
    torch.testing.assert_close(model.net[1].running_mean, torch.tensor(POOLED_MEAN), rtol=1e-6, atol=0)
    torch.testing.assert_close(model.net[1].running_var, torch.tensor(POOLED_VAR), rtol=1e-6, atol=0)


def test_a_failing_batch_restores_everything():
    model = tiny_conv_net()
    model.train()
    bn = model[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    with pytest.raises(TypeError, match="tensors"):
        recalibrate_batchnorm(model, [B1, (B2, 1)])
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert bn.momentum == 0.1 and all(m.training for m in model.modules())


def test_a_model_without_batchnorm_runs_nothing():
    model = nn.Sequential(nn.Linear(2, 2))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert recalibrate_batchnorm(model, [torch.zeros(1, 2)]) == 0
    assert calls == []
