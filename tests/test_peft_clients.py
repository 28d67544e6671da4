"""Plain peft and Transformers adapter calls on packed 1-bit models, with no `stompp_lora_config`: peft's own custom
module mechanism gets the packed layers' LoRA layers (`stompp_hf.integrations.peft.register_with_peft`); LoRA on
packed convolutions (timm) trains, saves, reloads and merges back into a latent StoMPP model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from peft import AutoPeftModelForSequenceClassification, LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForSequenceClassification, pipeline

from stompp_hf import ProgressionController, StoMPPConfig, prepare_model, stompp_modules
from stompp_hf.export import binarization_progress
from stompp_hf.integrations.peft import LoraBinaryConv2d, LoraBinaryLinear, merge_lora_into_latent
from stompp_hf.integrations.timm.io import from_pretrained, save_pretrained
from stompp_hf.nn import BinaryConv2d, BinaryLinear, StoMPPConv2d

from .client_utils import LABELS, packed_bert, sentences, tiny_tokenizer

SIZE = 12


@pytest.fixture
def adapter(tmp_path):
    """A packed tiny BERT, a LoRA adapter trained-like (random B) on it with plain `get_peft_model`, and the
    adapter's logits on `sentences()`."""
    packed = packed_bert(tmp_path)
    base = AutoModelForSequenceClassification.from_pretrained(str(packed))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, LoraBinaryLinear)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(0))
    inputs = tiny_tokenizer()(sentences(), return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    return packed, tmp_path / "adapter", inputs, expected


def test_peft_model_from_pretrained(adapter):
    packed, path, inputs, expected = adapter
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(str(packed)), str(path))
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, expected)


def test_auto_peft_model(adapter):
    _, path, inputs, expected = adapter
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(path))  # the base named in adapter_config
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, expected)


def test_transformers_load_adapter(adapter):
    packed, path, inputs, expected = adapter
    model = AutoModelForSequenceClassification.from_pretrained(str(packed))
    model.load_adapter(str(path))
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, expected)


def test_pipeline_of_an_adapter_folder(adapter):
    packed, path, inputs, expected = adapter
    classify = pipeline("text-classification", model=str(path), tokenizer=str(packed))
    out = classify(sentences(), top_k=None)
    probabilities = expected.softmax(-1)
    for row, scores in zip(probabilities, out):
        by_label = {s["label"]: s["score"] for s in scores}
        assert set(by_label) == set(LABELS.values())  # the checkpoint's label names, not LABEL_0 / LABEL_1
        assert [by_label[LABELS[i]] for i in range(2)] == pytest.approx(row.tolist(), abs=1e-6)


def test_plain_get_peft_model_in_a_fresh_process(tmp_path):
    """What a user's script does: `import stompp_hf`, load the packed model, then peft with a plain LoraConfig."""
    packed = packed_bert(tmp_path)
    code = (
        "import stompp_hf\n"
        "from transformers import AutoModelForSequenceClassification\n"
        "from peft import LoraConfig, get_peft_model\n"
        "from peft.tuners.lora.model import LoraModel\n"
        "wrapped = lambda: getattr(LoraModel._create_new_module, '_stompp_wrapped', False)\n"
        "before = wrapped()\n"
        f"base = AutoModelForSequenceClassification.from_pretrained({str(packed)!r})\n"
        "model = get_peft_model(base, LoraConfig(r=2, target_modules=['query', 'value']))\n"
        "print(before, wrapped(), type(model.base_model.model.bert.encoder.layer[0].attention.self.query).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    # `import stompp_hf` patches nothing; loading a packed model lets peft put LoRA on its layers
    assert out.stdout.strip().splitlines()[-1] == "False True LoraBinaryLinear"


def test_packed_layers_reject_what_needs_the_base_weight(tmp_path):
    base = AutoModelForSequenceClassification.from_pretrained(str(packed_bert(tmp_path)))
    with pytest.raises(ValueError, match=r"`init_lora_weights='pissa'` initialises LoRA from the base layer"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["query"], init_lora_weights="pissa"))
    base = AutoModelForSequenceClassification.from_pretrained(str(packed_bert(tmp_path, "again")))
    with pytest.raises(ValueError, match=r"DoRA \(`use_dora=True`\) needs the base layer.s full-precision weight"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["query"], use_dora=True))


def _cnn(sites: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet8", num_classes=4, in_chans=1, channels=(4, 4, 8))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, SIZE, SIZE)}
    config = StoMPPConfig(weights="stompp_ste", activations="stompp_ste", activation_sites=sites, refresh_rate=1)
    prepare_model(model, config).train()
    with torch.no_grad():
        model(torch.randn(8, 1, SIZE, SIZE))  # measures the activation scales
    controller = ProgressionController(model, 2)
    controller.advance(1)
    controller.advance(2)
    return model.eval()


@pytest.mark.parametrize("sites", ["input", "activation"])
def test_lora_on_packed_convolutions_trains_saves_reloads_and_merges(sites, tmp_path):
    save_pretrained(_cnn(sites), tmp_path / "packed", model_args={"in_chans": 1, "channels": (4, 4, 8)})
    targets = r".*layer\d\.0\.conv\d"
    model = get_peft_model(from_pretrained(str(tmp_path / "packed")), LoraConfig(r=2, target_modules=targets))
    adapted = [m for m in model.modules() if isinstance(m, LoraBinaryConv2d)]
    assert len(adapted) == 6 and all(isinstance(m.get_base_layer(), BinaryConv2d) for m in adapted)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    x = torch.randn(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    model.eval()  # BatchNorm statistics stay those of the base: they are not part of the adapter
    # Packed convs binarize their inputs ("input"), or a packed BinaryActivation does ("activation"), with a
    # straight-through gradient when autograd tracks the input: every adapter learns in both topologies.
    nn.functional.cross_entropy(model(x), torch.arange(8) % 4).backward()
    assert all(m.lora_B["default"].weight.grad.abs().sum() > 0 for m in adapted)
    with torch.no_grad():
        for m in adapted:
            m.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(from_pretrained(str(tmp_path / "packed")), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), expected)

    merged = merge_lora_into_latent(model)
    convs = [m for m in stompp_modules(merged).values() if isinstance(m, StoMPPConv2d)]
    assert len(convs) == 6 and binarization_progress(merged).complete
    with torch.no_grad():
        logits = merged.eval()(x)
    save_pretrained(merged, tmp_path / "merged", model_args={"in_chans": 1, "channels": (4, 4, 8)})
    again = from_pretrained(str(tmp_path / "merged")).eval()
    assert sum(isinstance(m, BinaryConv2d) for m in again.modules()) == 6
    with torch.no_grad():
        assert torch.equal(again(x), logits)


def test_merge_of_a_conv_delta_is_the_composed_kernel(tmp_path):
    save_pretrained(_cnn("input"), tmp_path / "packed", model_args={"in_chans": 1, "channels": (4, 4, 8)})
    model = get_peft_model(from_pretrained(str(tmp_path / "packed")), LoraConfig(r=2, target_modules=["conv1"]))
    layer = model.base_model.model.layer2[0].conv1
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(0))
        x = torch.randn(2, 4, SIZE, SIZE)
        lora_only = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        geometry = dict(stride=layer.base_layer.stride, padding=layer.base_layer.padding)
        assert torch.allclose(
            nn.functional.conv2d(x, layer.get_delta_weight("default"), **geometry), lora_only, atol=1e-5
        )
    with pytest.raises(ValueError, match="run one forward pass"):
        merge_lora_into_latent(model)  # input sites: the merged input mask needs the input shape


def test_a_custom_module_the_user_registered_for_packed_layers_stays_theirs(tmp_path):
    class MyLora(LoraBinaryLinear):
        pass

    config = LoraConfig(r=2, target_modules=["query"])
    config._register_custom_module({BinaryLinear: MyLora})
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(str(packed_bert(tmp_path))), config)
    assert type(model.base_model.model.bert.encoder.layer[0].attention.self.query) is MyLora
