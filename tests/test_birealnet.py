"""Bi-Real Net 18 / 34 as timm models: shapes, parameter counts, unit semantics and the timm model API."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import group_modules
from torch import nn

import stompp_hf.integrations.timm.birealnet  # noqa: F401  (registers the models)
from stompp_hf.integrations.timm.birealnet import BiRealBlock, BiRealNet

DEPTHS = {"birealnet18": (4, 4, 4, 4), "birealnet34": (6, 8, 12, 6)}
CHANNELS = (64, 128, 256, 512)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _expected_params(depths: tuple[int, ...], num_classes: int = 1000, in_chans: int = 3) -> int:
    """Count by hand: stem conv 7x7 + BN, per unit a 3x3 conv + BN (+ 1x1 conv + BN downsample), fc."""
    bn = 2  # weight and bias per channel
    total = in_chans * 64 * 7 * 7 + bn * 64
    in_chs = 64
    for depth, out_chs in zip(depths, CHANNELS):
        for _ in range(depth):
            total += in_chs * out_chs * 3 * 3 + bn * out_chs
            if in_chs != out_chs:
                total += in_chs * out_chs + bn * out_chs
            in_chs = out_chs
    return total + 512 * num_classes + num_classes


@pytest.fixture(scope="module")
def model18() -> BiRealNet:
    torch.manual_seed(0)
    return timm.create_model("birealnet18", num_classes=10).eval()


@pytest.mark.parametrize("name", ["birealnet18", "birealnet34"])
def test_create_and_param_count(name: str) -> None:
    model = timm.create_model(name)
    assert isinstance(model, BiRealNet)
    assert name in timm.list_models("birealnet*")
    units = [m for m in model.modules() if isinstance(m, BiRealBlock)]
    assert len(units) == sum(DEPTHS[name])
    assert _n_params(model) == _expected_params(DEPTHS[name])
    # The conv / BN / downsample shapes are exactly ResNet's, so the counts match too.
    assert _n_params(model) == {"birealnet18": 11_689_512, "birealnet34": 21_797_672}[name]


def test_no_sign_and_only_plain_convs() -> None:
    model = timm.create_model("birealnet18")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
    three = [n for n in convs if model.get_submodule(n).kernel_size == (3, 3)]
    assert len(three) == 16
    assert [n for n in convs if "downsample" in n] == [f"layer{s}.0.downsample.1" for s in (2, 3, 4)]
    acts = [m for m in model.modules() if isinstance(m, BiRealBlock)]
    assert all(isinstance(u.act, nn.Identity) for u in acts)


def test_forward_backward_shapes(model18: BiRealNet) -> None:
    model = timm.create_model("birealnet18", num_classes=10).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())
    assert model.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, 512, 2, 2)


def test_odd_input_size_downsample_matches_conv() -> None:
    model = timm.create_model("birealnet18", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 200, 200)).shape == (1, 3)  # 50 -> 25 -> 13 -> 7


def test_num_classes_in_chans_reset_classifier() -> None:
    model = timm.create_model("birealnet18", num_classes=7, in_chans=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    assert _n_params(model) == _expected_params(DEPTHS["birealnet18"], num_classes=7, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 7)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == (2, 512)
    model.reset_classifier(4, global_pool="catavgmax")
    assert model.fc.in_features == 1024 and model(x).shape == (2, 4)
    assert timm.create_model("birealnet18", num_classes=0)(x.repeat(1, 3, 1, 1)).shape == (2, 512)


def test_pretrained_cfg_names_real_modules(model18: BiRealNet) -> None:
    cfg = model18.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    first, classifier = model18.get_submodule(cfg["first_conv"]), model18.get_submodule(cfg["classifier"])
    assert first is model18.conv1 and isinstance(first, nn.Conv2d) and first.kernel_size == (7, 7)
    assert classifier is model18.get_classifier() and isinstance(classifier, nn.Linear)
    assert model18.get_classifier(name_only=True) == cfg["classifier"]


@pytest.mark.parametrize("name", ["birealnet18", "birealnet34"])
def test_group_matcher_one_group_per_unit_in_forward_order(name: str) -> None:
    model = timm.create_model(name)
    n_units = sum(DEPTHS[name])
    groups = group_modules(model, model.group_matcher())
    assert len(groups) == 1 + n_units + 1  # stem, units, classifier (unmatched, last)
    assert groups[0] == ["conv1", "bn1"]
    unit_names = [n for n, m in model.named_modules() if isinstance(m, BiRealBlock)]  # registration = forward order
    for gid, unit in enumerate(unit_names, start=1):
        assert groups[gid] and all(n.startswith(unit + ".") for n in groups[gid])
        assert unit + ".conv" in groups[gid]
    assert groups[n_units + 1] == ["fc"]
    covered = {n for names in groups.values() for n in names}
    assert covered == {n for n, m in model.named_modules() if m._parameters}

    coarse = group_modules(model, model.group_matcher(coarse=True))
    assert len(coarse) == 1 + 4 + 1
    assert [{n.split(".")[0] for n in coarse[i]} for i in range(1, 5)] == [{f"layer{s}"} for s in (1, 2, 3, 4)]


def test_forward_order_matches_registration_order(model18: BiRealNet) -> None:
    called: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, name=n: called.append(name))
        for n, m in model18.named_modules()
        if isinstance(m, BiRealBlock)
    ]
    with torch.no_grad():
        model18(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert called == [n for n, m in model18.named_modules() if isinstance(m, BiRealBlock)]


def test_pretrained_true_raises() -> None:
    with pytest.raises(RuntimeError, match="No pretrained weights exist for 'birealnet18'"):
        timm.create_model("birealnet18", pretrained=True)
    with pytest.raises(RuntimeError, match="birealnet34"):
        timm.create_model("birealnet34", pretrained=True, num_classes=10)


def test_pretrained_from_explicit_file(tmp_path, model18: BiRealNet) -> None:
    path = tmp_path / "w.pth"
    torch.save(model18.state_dict(), path)
    overlay = {"file": path, "num_classes": 10}  # a 10-class checkpoint: timm keeps its classifier
    reloaded = timm.create_model("birealnet18", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay)
    for (k, a), (_, b) in zip(model18.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), k


def _randomize_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)


@pytest.mark.parametrize("act_layer", [nn.Identity, nn.Hardtanh, "relu"])
def test_unit_is_bn_conv_act_plus_shortcut(act_layer) -> None:
    torch.manual_seed(0)
    model = timm.create_model("birealnet18", act_layer=act_layer).eval()
    _randomize_bn(model)
    x = torch.randn(2, 64, 16, 16)

    unit = model.layer1[1]  # identity shortcut
    assert unit.downsample is None
    a = x if act_layer is nn.Identity else (x.clamp(-1, 1) if act_layer is nn.Hardtanh else x.relu())
    bn = unit.bn
    y = torch.nn.functional.conv2d(a, unit.conv.weight, padding=1)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(unit(x), y + x)

    unit = model.layer2[0]  # Bi-Real downsample shortcut: avgpool 2x2 -> conv1x1 -> BN
    pool, conv, dbn = unit.downsample
    assert unit.conv.stride == (2, 2) and conv.kernel_size == (1, 1) and conv.bias is None
    a = x if act_layer is nn.Identity else (x.clamp(-1, 1) if act_layer is nn.Hardtanh else x.relu())
    main = unit.bn(torch.nn.functional.conv2d(a, unit.conv.weight, stride=2, padding=1))
    pooled = (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) / 4
    short = dbn(torch.einsum("oi,bihw->bohw", conv.weight[:, :, 0, 0], pooled))
    with torch.no_grad():
        torch.testing.assert_close(unit(x), main + short)


def test_act_layer_never_in_place() -> None:
    model = timm.create_model("birealnet18", act_layer=lambda: nn.ReLU(inplace=True)).eval()
    unit = model.layer1[0]
    assert unit.act.inplace is False
    x = torch.randn(1, 64, 8, 8)
    x0 = x.clone()
    with torch.no_grad():
        unit(x)
    assert torch.equal(x, x0)


def test_stem_has_no_relu_by_default(model18: BiRealNet) -> None:
    assert isinstance(model18.act1, nn.Identity)
    assert isinstance(timm.create_model("birealnet18", stem_act_layer=nn.ReLU).act1, nn.ReLU)


def test_features_plus_head_equals_forward(model18: BiRealNet) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model18(x)
        feats = model18.forward_features(x)
        torch.testing.assert_close(model18.forward_head(feats), out, rtol=0, atol=0)
        pre = model18.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model18.num_features) == (2, 512)
    torch.testing.assert_close(model18.fc(pre), out, rtol=0, atol=0)


def test_grad_checkpointing_same_output() -> None:
    torch.manual_seed(0)
    model = timm.create_model("birealnet18", num_classes=4, drop_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)


def test_feature_info_and_intermediates(model18: BiRealNet) -> None:
    info = model18.feature_info
    assert [f["num_chs"] for f in info] == [64, 64, 128, 256, 512]
    assert [f["reduction"] for f in info] == [2, 4, 8, 16, 32]
    for f in info:
        model18.get_submodule(f["module"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model18.forward_intermediates(x)
        torch.testing.assert_close(final, model18.forward_features(x), rtol=0, atol=0)
    assert [t.shape[1] for t in inter] == [64, 64, 128, 256, 512]
    assert [t.shape[-1] for t in inter] == [64 // f["reduction"] for f in info]

    features = timm.create_model("birealnet18", features_only=True, out_indices=(1, 2, 3, 4))
    with torch.no_grad():
        outs = features(x)
    assert [t.shape[1] for t in outs] == [64, 128, 256, 512]
