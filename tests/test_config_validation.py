"""`StoMPPConfig` validates on every path: construction, `from_dict` with overrides, assignment after construction,
and the copies transformers makes; and `modules_to_not_convert` patterns that are not regular expressions."""

import copy
import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
from torch import nn

from stompp_hf import StoMPPConfig, prepare_model
from stompp_hf.conversion import name_matches

# (field, invalid value, the ValueError message)
INVALID = [
    ("weights", "sign", "`weights` must be one of 'stompp', 'stompp_ste', 'ste', None, but got 'sign'."),
    ("schedule", "exp", "`schedule` must be one of"),
    ("refresh_rate", 0, "`refresh_rate` must be an int >= 1, but got 0."),
    ("refresh_rate", -3, "`refresh_rate` must be an int >= 1, but got -3."),
    ("refresh_rate", True, "`refresh_rate` must be an int >= 1, but got True."),
    ("refresh_rate", 2.0, "`refresh_rate` must be an int >= 1, but got 2.0."),
    ("refresh_rate", "10", "`refresh_rate` must be an int >= 1, but got '10'."),
    ("refresh_rate", None, "`refresh_rate` must be an int >= 1, but got None."),
    ("seed", 1.5, "`seed` must be an int, but got 1.5."),
    ("activation_clip", 0, "`activation_clip` must be a number > 0, but got 0."),
    ("activation_clip", math.inf, "`activation_clip` must be a finite number in [0.001, 1000]"),
    ("activation_clip", math.nan, "`activation_clip` must be a number > 0, but got nan."),
    ("activation_clip", 1e-300, "`activation_clip` must be a finite number in [0.001, 1000]"),
    ("activation_clip", 1e4, "`activation_clip` must be a finite number in [0.001, 1000]"),
    ("surge_eta", math.inf, "`surge_eta` must be a finite number > 0, but got inf."),
    ("packed", "yes", "`packed` must be a bool, but got 'yes'."),
    ("quant_method", "bitnet", "`quant_method` must be 'stompp', but got 'bitnet'."),
    ("modules_to_not_convert", "classifier", "`modules_to_not_convert` must be a list of module names / patterns"),
    (
        "modules_to_not_convert",
        ["pooler", "layer.(0"],
        "`modules_to_not_convert` pattern 'layer.(0' is not a valid regular expression",
    ),
]
IDS = [f"{f}={v!r}" for f, v, _ in INVALID]
# values construction accepted before (tests/test_config.py covers the others at construction)
NEWLY_REJECTED = [c for c in INVALID if "finite" in c[2] or "valid regular" in c[2]]


def check_message(info, message):
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("name,value,message", NEWLY_REJECTED, ids=[f"{f}={v!r}" for f, v, _ in NEWLY_REJECTED])
def test_construction_rejects(name, value, message):
    with pytest.raises(ValueError) as info:
        StoMPPConfig(**{name: value})
    check_message(info, message)


@pytest.mark.parametrize("name,value,message", INVALID, ids=IDS)
def test_from_dict_override_rejects(name, value, message):
    """`from_dict(d, **kwargs)` validates the overrides (transformers' base class set them unchecked)."""
    with pytest.raises(ValueError) as info:
        StoMPPConfig.from_dict({"quant_method": "stompp"}, **{name: value})
    check_message(info, message)


@pytest.mark.parametrize("name,value,message", INVALID, ids=IDS)
def test_assignment_rejects_and_keeps_the_old_value(name, value, message):
    config = StoMPPConfig(refresh_rate=7, activation_clip=3.0, modules_to_not_convert=["pooler"])
    before = config.to_dict()
    with pytest.raises(ValueError) as info:
        setattr(config, name, value)
    check_message(info, message)
    assert config.to_dict() == before


def test_refresh_rate_zero_after_construction_never_reaches_a_step():
    config = StoMPPConfig()
    with pytest.raises(ValueError, match=r"`refresh_rate` must be an int >= 1, but got 0\."):
        config.refresh_rate = 0
    assert config.refresh_rate == 100
    with pytest.raises(ValueError, match=r"`refresh_rate` must be an int >= 1, but got 0\."):
        config.update(refresh_rate=0)  # transformers' QuantizationConfigMixin.update sets attributes too
    assert config.refresh_rate == 100


def test_assignment_checks_the_cross_field_rules_it_touches():
    config = StoMPPConfig()
    config.activations = None  # a BWN: valid
    with pytest.raises(ValueError, match="`weights` and `activations` cannot both be None"):
        config.weights = None
    assert config.weights == "stompp"
    config.policy = "deterministic"  # valid now that activations is None
    with pytest.raises(ValueError, match="binary-weight networks"):
        config.activations = "stompp"
    with pytest.raises(ValueError, match="needs a progressive weight rule"):
        config.weights = "ste"
    assert (config.weights, config.activations, config.policy) == ("stompp", None, "deterministic")


def test_assignment_of_valid_values_normalizes_like_construction():
    config = StoMPPConfig()
    config.refresh_rate = np.int64(25)
    assert config.refresh_rate == 25 and type(config.refresh_rate) is int
    config.activation_clip = 3
    assert config.activation_clip == 3.0 and type(config.activation_clip) is float
    config.modules_to_not_convert = ("pooler", r"classifier\..*")
    assert config.modules_to_not_convert == ["pooler", r"classifier\..*"]
    # what the quantizer writes after construction
    config.granularity, config.activation_sites, config.packed = "block", "input", True
    assert config == StoMPPConfig(
        refresh_rate=25,
        activation_clip=3.0,
        modules_to_not_convert=["pooler", r"classifier\..*"],
        granularity="block",
        activation_sites="input",
        packed=True,
    )
    json.dumps(config.to_dict())  # still JSON-serializable (no numpy int left)
    config.some_loader_attribute = 1  # other attributes (transformers' loading attributes) are not restricted
    assert config.some_loader_attribute == 1 and "some_loader_attribute" not in config.to_dict()


def test_activation_clip_range_is_inclusive():
    assert StoMPPConfig(activation_clip=1e-3).activation_clip == 1e-3
    assert StoMPPConfig(activation_clip=1e3).activation_clip == 1e3
    for value in (9.99e-4, 1000.5, -math.inf):
        with pytest.raises(ValueError, match="`activation_clip`"):
            StoMPPConfig(activation_clip=value)


def test_from_dict_overrides_apply_together_and_return_unused():
    """Overrides are validated as one config, so the order of cross-field overrides does not matter."""
    with pytest.raises(ValueError, match="binary-weight networks"):
        StoMPPConfig.from_dict({"quant_method": "stompp"}, policy="deterministic")
    config = StoMPPConfig.from_dict({"quant_method": "stompp"}, policy="deterministic", activations=None)
    assert (config.policy, config.activations) == ("deterministic", None)
    config, unused = StoMPPConfig.from_dict({"refresh_rate": 5}, return_unused_kwargs=True, refresh_rate=9, foo=1)
    assert config.refresh_rate == 9 and unused == {"foo": 1}


def test_copies_stay_equal_and_keep_validating():
    config = StoMPPConfig(refresh_rate=10, seed=3)
    for other in (
        copy.deepcopy(config),
        copy.copy(config),
        pickle.loads(pickle.dumps(config)),
        StoMPPConfig.from_dict(json.loads(config.to_json_string(use_diff=False))),
        StoMPPConfig.from_dict(json.loads(config.to_json_string())),
    ):
        assert other == config
        with pytest.raises(ValueError, match="`refresh_rate`"):
            other.refresh_rate = 0
        assert other.refresh_rate == 10
    assert dict(config) == config.to_dict()  # transformers' __iter__: fields only
    with pytest.raises(ValueError, match="`refresh_rate`"):
        dataclasses.replace(config, refresh_rate=0)


def test_invalid_regex_message_names_pattern_and_error():
    with pytest.raises(ValueError) as info:
        StoMPPConfig(modules_to_not_convert=["classifier", "encoder.layer.[0"])
    message = str(info.value)
    assert "'encoder.layer.[0'" in message and "unterminated character set" in message


def test_name_matches_raises_on_invalid_regex():
    """The conversion itself no longer skips a pattern it cannot compile (the old `except re.error: continue`)."""
    with pytest.raises(ValueError, match=r"pattern 'fc\(' is not a valid regular expression"):
        name_matches("net.fc1", ["fc("])
    assert name_matches("net.fc1", ["fc1"]) and name_matches("net.fc1", [r"net\.fc\d"])
    assert not name_matches("net.fc2", ["fc1"])


def test_prepare_model_rejects_invalid_regex_set_in_place():
    """A list mutated in place bypasses assignment validation; conversion still reports the pattern."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    config = StoMPPConfig(modules_to_not_convert=["0"])
    config.modules_to_not_convert.append("1(")
    with pytest.raises(ValueError, match=r"pattern '1\(' is not a valid regular expression"):
        prepare_model(model, config)
