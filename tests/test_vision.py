"""timm integration: precision policy, stage order, activation injection, CIFAR stem, packed save/reload."""

import re
import warnings

import pytest
import timm
import torch
from torch import nn

from stompp_hf import ProgressionController, StoMPPConfig, binarized, prepare_model
from stompp_hf.conversion import stompp_modules
from stompp_hf.integrations.timm import is_timm_model
from stompp_hf.integrations.timm.io import from_pretrained, save_pretrained
from stompp_hf.integrations.timm.policy import cifar_stem, default_modules_to_not_convert, shortcut_layers
from stompp_hf.nn import BinaryConv2d, StoMPPConv2d

# The input-site topology (each binarized conv binarizes its own input, real residual stream) with one stage per
# residual block; the paper-BNN defaults (activation sites, per-tensor stages) are tested in test_paper_bnn.py.
CNN = StoMPPConfig(weight_scale="none", activation_scale="none", activation_sites="input", granularity="block")


def _convs(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _downsample_convs(model):
    return [n for n in _convs(model) if ".downsample." in n]


# name, blocks (= stages), binarized convs per block, projection shortcuts (stages 2-4 change width and stride;
# ResNet-50's first block also widens 64 -> 256)
MODELS = [
    ("resnet18", 8, 2, 3),
    ("resnet34", 16, 2, 3),
    ("resnet50", 16, 3, 4),
    ("birealnet18", 16, 1, 3),
    ("birealnet34", 32, 1, 3),
]


@pytest.mark.parametrize("name,blocks,per_block,projections", MODELS, ids=[m[0] for m in MODELS])
def test_resnet_family_policy_and_stages(name, blocks, per_block, projections):
    model = timm.create_model(name, num_classes=10)
    assert is_timm_model(model)
    downsample = _downsample_convs(model)
    assert len(downsample) == projections
    expected_fp = sorted(["conv1", "fc"] + downsample)
    assert sorted(shortcut_layers(model)) == sorted(
        n for n, m in model.named_modules() if n.count(".downsample.") and not list(m.children())
    )
    prepare_model(model, CNN)
    converted = stompp_modules(model)
    assert len(converted) == blocks * per_block
    assert sorted(set(_convs(model)) - set(converted)) == expected_fp
    assert all(isinstance(model.get_submodule(n), nn.Conv2d | nn.Linear) for n in expected_fp)
    # one stage per residual block, numbered in forward (registration) order
    stages = [m.stompp_stage for m in converted.values()]
    assert stages == sorted(stages) and sorted(set(stages)) == list(range(blocks))
    assert all(stages.count(s) == per_block for s in range(blocks))


def test_mobilenetv2_policy_and_stages():
    model = timm.create_model("mobilenetv2_100", num_classes=10)
    prepare_model(model, CNN)
    converted = stompp_modules(model)
    # every conv except the stem, plus conv_head; the classifier stays full precision. No projection shortcuts.
    assert sorted(set(_convs(model)) - set(converted)) == ["classifier", "conv_stem"]
    assert len(converted) == len(_convs(model)) - 2
    blocks = sum(len(stage) for stage in model.blocks)
    stages = [m.stompp_stage for m in converted.values()]
    assert sorted(set(stages)) == list(range(blocks))  # conv_head joins the last block's group (timm's grouping)
    assert converted["conv_head"].stompp_stage == blocks - 1
    # the ReLU6 feeding each binarized pointwise/depthwise conv is replaced; the head's (feeding the FP classifier)
    # is kept
    assert isinstance(model.blocks[1][0].bn1.act, nn.Identity)
    assert isinstance(model.bn2.act, nn.ReLU6)


def test_activation_injection_only_where_binarized_inputs_come_from_relu():
    model = timm.create_model("resnet18", num_classes=10)
    prepare_model(model, CNN)
    replaced = model.stompp_replaced_activations
    # the stem ReLU feeds layer1.0.conv1 through the max-pool; the last block's act2 feeds only the FP classifier
    assert "act1" in replaced and "layer4.1.act2" not in replaced
    assert len(replaced) == 16  # stem + 8 blocks x 2 - the last act2
    assert all(isinstance(model.get_submodule(n), nn.Identity) for n in replaced)
    assert isinstance(model.layer4[1].act2, nn.ReLU)
    # a binary-weight network keeps its activations
    bwn = prepare_model(
        timm.create_model("resnet18", num_classes=10), StoMPPConfig(activations=None, activation_sites="input")
    )
    assert not getattr(bwn, "stompp_replaced_activations", [])
    assert isinstance(bwn.layer1[0].act1, nn.ReLU)


def test_defaults_are_anchored_patterns():
    model = timm.create_model("resnet18", num_classes=10)
    patterns = default_modules_to_not_convert(model)
    assert "^conv1$" in patterns and "^fc$" in patterns
    assert all(re.fullmatch(p, "layer1.0.conv1") is None for p in patterns)


def test_cifar_stem_forward_backward_and_input_masks():
    model = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=(8, 8, 8, 8))
    cifar_stem(model)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    assert model.stompp_cifar_stem and model.pretrained_cfg["input_size"] == (1, 32, 32)
    assert "cifar_stem" not in model.pretrained_cfg  # timm's own fields only: timm parses a saved config.json
    prepare_model(model, CNN)
    x = torch.randn(4, 1, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no controller: masks do not advance
        out = model(x)
    out.sum().backward()
    assert out.shape == (4, 10)
    conv = model.layer1[0].conv1
    assert isinstance(conv, StoMPPConv2d)
    # per-sample [C, H, W]: the 64-channel stem output at full resolution (no stem down-sampling)
    assert conv.input_mask.shape == (64, 32, 32)
    assert conv.weight.grad is not None and model.conv1.weight.grad is not None


def _train_to_binary(model, steps=6):
    controller = ProgressionController(model, total_steps=steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(0)
    for step in range(steps):
        x = torch.randn(4, 1, 16, 16)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        controller.advance(step + 1)
    return model


@pytest.mark.parametrize("name", ["resnet18", "birealnet18"])
def test_packed_save_reload_is_bit_exact(name, tmp_path, capsys):
    args = {"channels": (8, 8, 16, 16), "in_chans": 1}
    model = timm.create_model(name, num_classes=10, **args)
    cifar_stem(model)
    # input masks are sized at conversion for the training resolution, read from `pretrained_cfg["input_size"]`
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "label_names": [str(i) for i in range(10)],
        "input_size": (1, 16, 16),
    }
    config = StoMPPConfig(
        weights="stompp_ste", activations="stompp_ste", weight_scale="channel", activation_sites="input"
    )
    prepare_model(model, config)
    _train_to_binary(model)
    model.eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
        with binarized(model):
            assert torch.equal(model(x), expected)  # training is complete: as trained == binarized
    save_pretrained(model, tmp_path, model_args=args)
    reloaded = from_pretrained(str(tmp_path)).eval()
    packed = [m for m in reloaded.modules() if isinstance(m, BinaryConv2d)]
    assert len(packed) == len(stompp_modules(model))
    assert not any(isinstance(m, StoMPPConv2d) for m in reloaded.modules())
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)
    # the saved metadata comes back, and the command-line summary reads timm folders
    assert reloaded.pretrained_cfg["label_names"] == model.pretrained_cfg["label_names"]
    assert list(reloaded.pretrained_cfg["input_size"]) == [1, 16, 16]
    from stompp_hf.__main__ import main

    assert main(["summary", str(tmp_path), "--markdown"]) == 0
    table = capsys.readouterr().out
    binary_weights = sum(m.weight.numel() for m in stompp_modules(model).values())
    assert f"| **{binary_weights:,}** |" in table  # the total row counts exactly the binarized conv weights


def test_unfinished_model_saves_latent_weights(tmp_path):
    args = {"channels": (8, 8, 8, 8), "in_chans": 1}
    model = timm.create_model("resnet18", num_classes=10, **args)
    cifar_stem(model)
    prepare_model(model, CNN)
    save_pretrained(model, tmp_path, model_args=args)
    reloaded = from_pretrained(str(tmp_path))
    assert not reloaded.stompp_config.packed
    assert len(stompp_modules(reloaded)) == len(stompp_modules(model))
    state, again = model.state_dict(), reloaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


def test_model_card_for_a_timm_model():
    from stompp_hf.integrations.transformers.hub import model_card

    model = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=(8, 8, 8, 8))
    cifar_stem(model)
    prepare_model(model, CNN)
    card = str(model_card(model, "user/bnn-resnet18", dataset="fashion_mnist", metrics={"eval_accuracy": 0.9}))
    assert "library_name: timm" in card
    assert "from stompp_hf.integrations.timm import from_pretrained" in card
    assert 'model = from_pretrained("hf-hub:user/bnn-resnet18")' in card
    assert "stompp_hf.vision" not in card  # the load snippet uses no deprecated import path
    assert "AutoModel" not in card
    assert "MACs" in card  # the size table counts the convolutions on a 32x32 example
