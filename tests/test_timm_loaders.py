"""timm's own loading paths on StoMPP checkpoints: `config.json` keeps timm's `pretrained_cfg` (so timm parses it),
every path that loads weights into timm's plain architecture fails loudly, and `from_pretrained` takes timm's names
(`local-dir:`, `hf-hub:`) and gives the packed model."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.models import PretrainedCfg

from stompp_hf import ProgressionController, StoMPPConfig, prepare_model
from stompp_hf.integrations.timm.io import from_pretrained, save_pretrained
from stompp_hf.integrations.timm.policy import cifar_stem
from stompp_hf.nn import BinaryConv2d

ARGS = {"channels": (8, 8, 8, 8), "in_chans": 1}
CONFIGS = {
    "paper": StoMPPConfig(weight_scale="none", activation_scale="none"),  # no scales: only the packed weights differ
    "scaled": StoMPPConfig(weights="stompp_ste", activations="stompp_ste", activation_sites="input"),
}


def _packed(folder, stem: bool, config: StoMPPConfig):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, **ARGS)
    if stem:
        cifar_stem(model)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, 16, 16)}
    prepare_model(model, config).train()
    with torch.no_grad():
        model(torch.randn(4, 1, 16, 16))  # measures the activation scales
    controller = ProgressionController(model, 2)
    controller.advance(1)
    controller.advance(2)
    model.eval()
    save_pretrained(model, folder, model_args=ARGS)
    return model


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("stem", [True, False], ids=["cifar_stem", "standard_stem"])
def test_timm_loaders_fail_loudly_and_from_pretrained_takes_their_names(tmp_path, stem, config):
    with pytest.warns(UserWarning, match="refresh_rate"):  # 2 steps: the masks freeze at once (a test shortcut)
        model = _packed(tmp_path, stem, CONFIGS[config])
    saved = json.loads((tmp_path / "config.json").read_text())
    PretrainedCfg(**saved["pretrained_cfg"])  # timm's own fields only
    assert saved.get("stompp_cifar_stem", False) is stem and "file" not in saved["pretrained_cfg"]
    # timm parses the folder: without `pretrained=True` it builds the plain architecture (random, as for any folder)
    plain = timm.create_model(f"local-dir:{tmp_path}")
    assert type(plain.layer1[0].conv1) is torch.nn.Conv2d and plain.num_classes == 10
    # every timm path that loads the weights stops: the packed layers' `weight` holds sign bits, not a kernel
    loud = r"size mismatch|Unexpected key|inconsistent with input_size"
    with pytest.raises(RuntimeError, match=loud):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    with pytest.raises(RuntimeError, match=loud):
        timm.create_model(
            "resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
            num_classes=10, **ARGS,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match=loud):
        timm.create_model("resnet18", checkpoint_path=str(tmp_path / "model.safetensors"), num_classes=10, **ARGS)
    # stompp_hf's loader, with timm's names, gives the packed model with bit-identical logits
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        for name in (str(tmp_path), f"local-dir:{tmp_path}"):
            reloaded = from_pretrained(name).eval()
            assert any(isinstance(m, BinaryConv2d) for m in reloaded.modules())
            assert torch.equal(reloaded(x), expected)


def test_from_pretrained_hub_name_and_legacy_cifar_stem_key(tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="refresh_rate"):
        model = _packed(tmp_path, True, CONFIGS["paper"])
    saved = json.loads((tmp_path / "config.json").read_text())
    # a checkpoint of stompp_hf 0.2.0.dev0 recorded the stem inside pretrained_cfg
    del saved["stompp_cifar_stem"]
    saved["pretrained_cfg"]["cifar_stem"] = True
    (tmp_path / "config.json").write_text(json.dumps(saved))
    calls = []

    def snapshot_download(repo_id, revision=None):
        calls.append((repo_id, revision))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    reloaded = from_pretrained("hf-hub:user/bnn-resnet18@v1").eval()
    assert calls == [("user/bnn-resnet18", "v1")]
    assert reloaded.stompp_cifar_stem and "cifar_stem" not in reloaded.pretrained_cfg
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        from_pretrained(tmp_path / "missing")
