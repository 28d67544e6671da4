import json

import pytest
import torch
from transformers import AutoConfig, BertForSequenceClassification

from stompp_hf import StoMPPConfig

INVALID = [
    ("weights", "sign", "`weights` must be one of 'stompp', 'stompp_ste', 'ste', None, but got 'sign'."),
    ("activations", "binary", "`activations` must be one of 'stompp', 'stompp_ste', 'ste', None, but got 'binary'."),
    (
        "schedule",
        "exp",
        "`schedule` must be one of 'cubic', 'quadratic', 'linear', 'cosine', 'flipped_quadratic', but got 'exp'.",
    ),
    ("order", "backward", "`order` must be one of 'forward', 'global', 'reverse', but got 'backward'."),
    ("policy", "greedy", "`policy` must be one of 'stochastic', 'deterministic', but got 'greedy'."),
    ("granularity", "stage", "`granularity` must be one of 'layer', 'block', 'module', None, but got 'stage'."),
    (
        "activation_sites",
        "output",
        "`activation_sites` must be one of 'activation', 'input', None, but got 'output'.",
    ),
    ("weight_scale", "tensor", "`weight_scale` must be one of 'channel', 'none', but got 'tensor'."),
    ("activation_scale", "channel", "`activation_scale` must be one of 'tensor', 'none', but got 'channel'."),
    ("compensation", "lsq", "`compensation` must be one of None, 'surge', but got 'lsq'."),
    ("refresh_rate", 0, "`refresh_rate` must be an int >= 1, but got 0."),
    ("refresh_rate", 2.5, "`refresh_rate` must be an int >= 1, but got 2.5."),
    ("seed", "1", "`seed` must be an int, but got '1'."),
    ("activation_clip", 0, "`activation_clip` must be a number > 0, but got 0."),
    ("activation_clip", "3", "`activation_clip` must be a number > 0, but got '3'."),
    (
        "modules_to_not_convert",
        "classifier",
        "`modules_to_not_convert` must be a list of module names / patterns or None, but got 'classifier'.",
    ),
    ("quant_method", "bitnet", "`quant_method` must be 'stompp', but got 'bitnet'."),
]


@pytest.mark.parametrize("field,value,message", INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_value_raises_naming_field(field, value, message):
    with pytest.raises(ValueError) as info:
        StoMPPConfig(**{field: value})
    assert str(info.value) == message


def test_invalid_combinations():
    with pytest.raises(ValueError, match="`weights` and `activations` cannot both be None"):
        StoMPPConfig(weights=None, activations=None)
    with pytest.raises(ValueError, match=r"`policy` 'deterministic' is only valid for binary-weight networks"):
        StoMPPConfig(policy="deterministic")
    with pytest.raises(ValueError, match=r"needs a progressive weight rule"):
        StoMPPConfig(policy="deterministic", activations=None, weights="ste")
    with pytest.raises(ValueError, match=r"`surge_eta` must be a number > 0, but got 0"):
        StoMPPConfig(compensation="surge", surge_eta=0)
    with pytest.raises(ValueError, match=r"Unknown StoMPPConfig field\(s\) \['bits'\]"):
        StoMPPConfig.from_dict({"quant_method": "stompp", "bits": 1})


def test_defaults_are_the_papers():
    c = StoMPPConfig()
    assert (c.weights, c.activations, c.schedule, c.refresh_rate, c.order) == (
        "stompp",
        "stompp",
        "cubic",
        100,
        "forward",
    )
    # stages and activation sites follow the model when None: per-tensor stages at the paper's activation sites for
    # vanilla CNNs, blocks at layer inputs for transformers (resolved at conversion)
    assert (c.granularity, c.activation_sites) == (None, None)
    assert (c.policy, c.weight_scale, c.activation_scale) == (
        "stochastic",
        "channel",
        "tensor",
    )
    assert c.compensation is None and c.modules_to_not_convert is None and c.seed == 0
    assert c.quant_method == "stompp"


def test_dict_round_trip():
    c = StoMPPConfig(
        weights="ste",
        activations="stompp_ste",
        schedule="cosine",
        refresh_rate=10,
        order="reverse",
        granularity="module",
        weight_scale="none",
        activation_scale="none",
        activation_clip=3.0,
        modules_to_not_convert=["pooler"],
        seed=7,
    )
    again = StoMPPConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c


def test_round_trip_through_save_pretrained(tiny_bert_dir, tmp_path):
    config = StoMPPConfig(schedule="linear", refresh_rate=50, seed=3, activations="stompp_ste")
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=config)
    model.train()
    with pytest.warns(UserWarning, match="without a StoMPPCallback"):
        model(input_ids=torch.randint(5, 60, (4, 8)))  # measures the activation scales
    out = tmp_path / "saved"
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert StoMPPConfig.from_dict(saved) == config
    loaded = AutoConfig.from_pretrained(out).quantization_config
    assert StoMPPConfig.from_dict(loaded) == config
    reloaded = BertForSequenceClassification.from_pretrained(out)
    assert reloaded.config.quantization_config == config
    # a latent (still progressing) checkpoint reloads as StoMPP modules with the same weights and scales
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    assert any(k.endswith("input_binarizer.scale") for k in after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(float(v) > 0 for k, v in after.items() if k.endswith("input_binarizer.scale"))
