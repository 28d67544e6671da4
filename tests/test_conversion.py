import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
)

from stompp_hf import StoMPPConfig, StoMPPLinear, prepare_model, stompp_modules
from stompp_hf.conversion import default_modules_to_not_convert

from .testing_utils import tiny_bert_config, tiny_distilbert_config, tiny_roberta_config

# (name, config builder, expected converted count, expected full-precision linears, expected stage count)
ENCODERS = [
    ("bert", lambda: tiny_bert_config(), 2 * 6 + 1, {"classifier"}, 3),
    (
        "roberta",
        tiny_roberta_config,
        2 * 6 + 1,
        {"classifier.out_proj"},
        3,
    ),
    (
        "distilbert",
        tiny_distilbert_config,
        2 * 6 + 1,
        {"classifier"},
        3,
    ),
]


@pytest.mark.parametrize("name,make_config,n_converted,kept_fp,n_stages", ENCODERS, ids=[e[0] for e in ENCODERS])
def test_from_pretrained_converts_encoder_families(tmp_path, name, make_config, n_converted, kept_fp, n_stages):
    torch.manual_seed(0)
    reference = AutoModelForSequenceClassification.from_config(make_config())
    reference.save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, quantization_config=StoMPPConfig())
    converted = stompp_modules(model)
    assert len(converted) == n_converted
    fp = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert fp == kept_fp
    assert 1 + max(m.stompp_stage for m in converted.values()) == n_stages
    # the pretrained weights are loaded into the StoMPP modules unchanged
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, ref[n]), n
    # before any progression every mask is continuous: weights pass through, inputs are clipped at beta
    x = torch.randint(5, 60, (2, 8))
    model.train()
    out = model(input_ids=x, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(m.weight.grad is not None for m in converted.values())


def test_bert_stages_follow_encoder_blocks(tiny_bert_dir):
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    stages = {n: m.stompp_stage for n, m in stompp_modules(model).items()}
    assert stages["bert.encoder.layer.0.attention.self.query"] == 0
    assert stages["bert.encoder.layer.0.output.dense"] == 0
    assert stages["bert.encoder.layer.1.attention.self.key"] == 1
    assert stages["bert.pooler.dense"] == 2
    per_module = BertForSequenceClassification.from_pretrained(
        tiny_bert_dir, quantization_config=StoMPPConfig(granularity="module")
    )
    assert [m.stompp_stage for m in stompp_modules(per_module).values()] == list(range(13))


def test_swap_reuses_parameters_without_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    weight, bias = model[2].weight, model[2].bias
    prepare_model(model, StoMPPConfig())
    assert isinstance(model[2], StoMPPLinear) and isinstance(model[2], nn.Linear)
    assert model[2].weight is weight and model[2].bias is bias
    assert type(model[0]) is nn.Linear and type(model[4]) is nn.Linear  # first and last layer stay FP
    assert default_modules_to_not_convert(nn.Sequential(nn.Linear(2, 2))) == []


def test_meta_device_swap():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
        prepare_model(model, StoMPPConfig())
    assert model[1].weight.is_meta and isinstance(model[1], StoMPPLinear)


def test_modules_to_not_convert_patterns(tiny_bert_dir):
    config = StoMPPConfig(modules_to_not_convert=["pooler", r".*\.attention\.self\.(query|key)", "classifier"])
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=config)
    names = set(stompp_modules(model))
    assert "bert.pooler.dense" not in names
    assert not any(n.endswith(("query", "key")) for n in names)
    assert "bert.encoder.layer.1.attention.self.value" in names and len(names) == 8


def test_conversion_that_matches_nothing_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"converted no module of Sequential.*modules_to_not_convert=\['0', '2'\]"):
        prepare_model(model, StoMPPConfig(modules_to_not_convert=["0", "2"]))
    with pytest.raises(ValueError, match=r"accepted by filter_fn"):
        prepare_model(
            nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)]), StoMPPConfig(), filter_fn=lambda m, n: False
        )
    with pytest.raises(ValueError, match="already converted"):
        model = prepare_model(nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)]))
        prepare_model(model)


def test_activation_scale_starts_unmeasured_when_loading_fp_checkpoint(tiny_bert_dir):
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, quantization_config=StoMPPConfig())
    scales = [b for n, b in model.named_buffers() if n.endswith("input_binarizer.scale")]
    assert len(scales) == 13 and all(float(s) == 0.0 for s in scales)
    model.train()
    model(input_ids=torch.randint(5, 60, (2, 8)))
    assert all(float(s) > 0.0 for s in scales)
