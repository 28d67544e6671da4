"""The core state of StoMPP: schedules and stage progress, masks (sampling, soft refresh), sign packing, and the
mask progression a `ProgressionController` drives."""

import math

import pytest
import torch
from torch import nn

from stompp_hf import ProgressionController, StoMPPConfig, prepare_model
from stompp_hf.core.masks import MaskState, make_generator, mix_seed, sample_distinct
from stompp_hf.core.packing import pack_signs, unpack_signs
from stompp_hf.core.schedules import SCHEDULES, get_schedule, stage_progress

EXPECTED = {"linear": 0.5, "quadratic": 0.25, "cubic": 0.125, "flipped_quadratic": 0.75, "cosine": 0.5}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_schedule_shapes(name):
    p = get_schedule(name)
    assert p(0.0) == 0.0 and math.isclose(p(1.0), 1.0)
    assert math.isclose(p(0.5), EXPECTED[name])
    values = [p(i / 20) for i in range(21)]
    assert values == sorted(values)


def test_schedule_registry_rejects_unknown_and_duplicates():
    assert set(SCHEDULES) == set(EXPECTED)
    with pytest.raises(ValueError, match=r"`schedule` must be one of"):
        get_schedule("step")
    from stompp_hf import register_schedule

    with pytest.raises(ValueError, match="already registered"):
        register_schedule("cubic")(lambda t: t)


def test_stage_progress_orders():
    # 3 stages over 30 steps: forward stage s transitions during steps [10 s, 10 (s + 1)]
    assert [stage_progress(15, 30, s, 3, "forward") for s in range(3)] == [1.0, 0.5, 0.0]
    assert [stage_progress(15, 30, s, 3, "reverse") for s in range(3)] == [0.0, 0.5, 1.0]
    assert [stage_progress(15, 30, s, 3, "global") for s in range(3)] == [0.5, 0.5, 0.5]
    for order in ("forward", "reverse", "global"):
        assert all(stage_progress(30, 30, s, 3, order) == 1.0 for s in range(3))
        assert all(stage_progress(0, 30, s, 3, order) == 0.0 for s in range(3))
        assert all(stage_progress(31, 30, s, 3, order) == 1.0 for s in range(3))


def test_sample_distinct_is_exact_and_deterministic():
    for n, k in [(1000, 10), (1000, 600), (50, 50), (100_000, 1000)]:
        idx = sample_distinct(n, k, make_generator(torch.device("cpu"), 1, 2), torch.device("cpu"))
        assert idx.numel() == k and torch.unique(idx).numel() == k and int(idx.max()) < n
        again = sample_distinct(n, k, make_generator(torch.device("cpu"), 1, 2), torch.device("cpu"))
        assert torch.equal(idx, again)
    assert mix_seed(0, 1, 2) != mix_seed(0, 2, 1)


def test_soft_refresh_redraws_exactly_floor_n_over_r():
    state = MaskState((37, 11))  # n = 407
    gen = make_generator(torch.device("cpu"), 0)
    before = state.materialize(torch.device("cpu")).clone()
    drawn = state.soft_refresh(1.0, 100, gen, torch.device("cpu"))  # p = 1: every drawn entry becomes frozen
    assert drawn == 407 // 100 == 4
    assert int((state.value != before).sum()) == 4
    assert state.frozen_fraction == 4 / 407


def test_constant_masks_allocate_nothing():
    state = MaskState((1000, 1000))
    assert state.value is False and state.frozen_fraction == 0.0
    state.fill(True)
    assert state.value is True and state.frozen_fraction == 1.0


# ---------------------------------------------------------------------------------------------------------------
# sign packing: pack_signs / unpack_signs (the +-1 storage of masks and of packed weights)


@pytest.mark.parametrize("k", [1, 7, 8, 13, 16, 64, 67])
def test_pack_unpack_round_trip(k):
    g = torch.Generator().manual_seed(k)
    positive = torch.rand(5, k, generator=g) < 0.5
    packed = pack_signs(positive)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (5, (k + 7) // 8)
    assert torch.equal(unpack_signs(packed, k), positive)
    for dtype in (torch.float32, torch.bfloat16):  # straight to +-1 values
        assert torch.equal(unpack_signs(packed, k, dtype), positive.to(dtype) * 2 - 1)
    if k % 8:  # the short last byte is zero-padded
        assert int(packed[:, -1].max()) < (1 << (k % 8))


def test_pack_signs_hand_computed_bytes():
    row = torch.tensor([[True, False, False, True, True, True, False, False, True]])  # + - - + + + - - +
    packed = pack_signs(row)
    assert packed.tolist() == [[0b00111001, 0b00000001]]
    assert torch.equal(unpack_signs(torch.tensor([[0b00111001, 0b00000001]], dtype=torch.uint8), 9), row)
    assert pack_signs(torch.ones(2, 8, dtype=torch.bool)).tolist() == [[255], [255]]
    assert pack_signs(torch.zeros(1, 3, dtype=torch.bool)).tolist() == [[0]]


def test_pack_signs_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D bool tensor"):
        pack_signs(torch.randn(2, 8))
    with pytest.raises(ValueError, match="2-D bool tensor"):
        pack_signs(torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"unpack_signs expects uint8 \[rows, 2\]"):
        unpack_signs(torch.zeros(2, 3, dtype=torch.uint8), 13)
    with pytest.raises(ValueError, match="unpack_signs expects uint8"):
        unpack_signs(torch.zeros(2, 2, dtype=torch.int64), 13)
    with pytest.raises(ValueError, match="unpack_signs expects uint8"):
        unpack_signs(torch.zeros(2, dtype=torch.uint8), 8)


# ---------------------------------------------------------------------------------------------------------------
# mask progression on models


def mlp(width=16, depth=4):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 2))


def test_restore_equals_stepping():
    torch.manual_seed(0)
    config = StoMPPConfig(refresh_rate=5, modules_to_not_convert=[])
    a = prepare_model(mlp(), config)
    b = prepare_model(mlp(), config)
    ctrl_a, ctrl_b = ProgressionController(a, 25), ProgressionController(b, 25)
    for target in (3, 7, 12, 25):
        while ctrl_a.step < target:
            ctrl_a.advance(ctrl_a.step + 1)
        ctrl_b.restore(target)
        for (_, ma), (_, mb) in zip(a.named_modules(), b.named_modules()):
            if hasattr(ma, "weight_mask"):
                assert torch.equal(ma.weight_mask, mb.weight_mask)
                assert torch.equal(ma.input_mask, mb.input_mask)


def test_deterministic_policy_freezes_weights_closest_to_scale():
    torch.manual_seed(0)
    config = StoMPPConfig(activations=None, policy="deterministic", weight_scale="none", modules_to_not_convert=[])
    model = prepare_model(nn.Sequential(nn.Linear(4, 4)), config)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.99, 0.1, -1.2, 0.5]] * 4))
    ctrl = ProgressionController(model, total_steps=2)
    ctrl.advance(1)  # tau = 0.5, cubic: p = 0.125 -> round(0.125 * 16) = 2 frozen entries
    mask = model[0].weight_mask
    assert int(mask.sum()) == 2 and bool(mask[:, 0].sum() == 2)  # |0.99| is the closest to 1
    assert model[0].input_mask is None and model[0].input_frozen_fraction is None
