"""The controller warns when `refresh_rate` cannot follow the schedule, and `suggested_refresh_rate` sizes r."""

import warnings

import pytest
import torch
from torch import nn

from stompp_hf import ProgressionController, StoMPPConfig, prepare_model
from stompp_hf.progression import suggested_refresh_rate


def model_with(layers=2, width=16, **overrides):
    """`layers` Linear(width, width) layers, all converted: one stage each; n = width^2 (weight), width (input)."""
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    cfg = dict(weights="stompp", activations="stompp", modules_to_not_convert=[])
    cfg.update(overrides)
    return prepare_model(nn.Sequential(*mods[:-1]), StoMPPConfig(**cfg))


def refresh_warnings(model, total_steps):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ProgressionController(model, total_steps)
    return [str(w.message) for w in caught if "refresh_rate" in str(w.message)]


def test_too_short_a_stage_warns_once_naming_the_tensors():
    # 2 stages of 10 steps, r = 100: k = 256 // 100 = 2 for weights, 0 for inputs, L / r = 0.1 < 3
    with pytest.warns(UserWarning, match="refresh_rate=100") as record:
        ProgressionController(model_with(refresh_rate=100), total_steps=20)
    messages = [str(w.message) for w in record if "refresh_rate" in str(w.message)]
    assert len(messages) == 1
    message = messages[0]
    assert "4 progressive tensor(s)" in message and "10 steps per stage" in message
    assert "`0` weight (n=256, k=2)" in message and "`0` input (n=16, k=0, never refreshes)" in message
    assert "`2` weight" in message and "`2` input" in message
    assert "`refresh_rate=1`" in message  # max(1, min(16, 10 // 8))


def test_a_long_stage_does_not_warn():
    # 2 stages of 500 steps, r = 16: k = 16 and 1, L / r = 31 redraws per entry
    assert refresh_warnings(model_with(refresh_rate=16), total_steps=1000) == []


def test_a_tensor_smaller_than_r_warns_even_in_a_long_stage():
    # L / r = 500 / 32 ~ 16 is fine, but the inputs have n = 16 < r = 32: they never refresh
    (message,) = refresh_warnings(model_with(refresh_rate=32), total_steps=1000)
    assert "2 progressive tensor(s)" in message and "never refreshes" in message
    assert "weight" not in message.split(": ", 1)[1].split(". Use")[0]  # only the inputs are listed
    assert "`refresh_rate=16`" in message  # min(n=16, 500 // 8 = 62)


def test_few_redraws_per_entry_warn_even_when_k_is_positive():
    # r = 4 <= n for every tensor, but 2 stages of 10 steps give L / r = 2.5 < 3 redraws per entry
    (message,) = refresh_warnings(model_with(refresh_rate=4), total_steps=20)
    assert "4 progressive tensor(s)" in message and "never refreshes" not in message
    assert refresh_warnings(model_with(refresh_rate=4), total_steps=24) == []  # L / r = 3


def test_global_order_uses_the_whole_progression_as_the_stage_length():
    # forward: L = 24 / 2 = 12, L / r = 1.5 warns; global: L = 24, L / r = 3 does not
    assert refresh_warnings(model_with(refresh_rate=8), total_steps=24)
    assert refresh_warnings(model_with(refresh_rate=8, order="global"), total_steps=24) == []
    assert refresh_warnings(model_with(refresh_rate=8, order="reverse"), total_steps=24)


def test_lists_at_most_five_tensors_plus_a_count():
    (message,) = refresh_warnings(model_with(layers=4, refresh_rate=100), total_steps=8)
    assert "8 progressive tensor(s)" in message and "and 3 more" in message
    assert message.count(" (n=") == 5


def test_deterministic_policy_and_plain_ste_do_not_warn():
    det = model_with(refresh_rate=100, activations=None, policy="deterministic")
    assert refresh_warnings(det, total_steps=4) == []
    ste = model_with(refresh_rate=100, weights="ste", activations="ste")
    assert refresh_warnings(ste, total_steps=4) == []


@pytest.mark.parametrize(
    "stage_steps,numel,expected",
    [
        (800, 10_000, 100),  # L / 8
        (800, 50, 50),  # at most n
        (801, 10_000, 100),  # floor
        (7, 100, 1),  # at least 1
        (0, 100, 1),
        (16, 1, 1),
        (8_000_000, 10**12, 1_000_000),
    ],
)
def test_suggested_refresh_rate(stage_steps, numel, expected):
    assert suggested_refresh_rate(stage_steps, numel) == expected


def test_the_suggested_rate_silences_the_warning_when_the_stage_allows():
    total_steps, stages, width = 400, 2, 16
    r = suggested_refresh_rate(total_steps // stages, width)  # the smallest tensor: the inputs
    assert r == 16
    assert refresh_warnings(model_with(refresh_rate=r), total_steps=total_steps) == []
