"""`save_pretrained` / `from_pretrained` for timm models in timm's Hub layout (`config.json` + `model.safetensors`),
packed to 1 bit per binarized weight when training is complete (`stompp_hf.export.checkpoint_format` decides).

`config.json` is timm's own: `pretrained_cfg` holds only the fields of timm's `PretrainedCfg`, so timm parses it
(`timm.create_model("local-dir:...")`, `hf-hub:` names); what StoMPP adds sits in top-level keys timm ignores
(`quantization_config`, `stompp_replaced_activations`, `stompp_cifar_stem`). timm's own loaders build the plain
architecture, whose layers cannot hold 1-bit weights: loading the weights (`pretrained=True`, `checkpoint_path`,
`pretrained_cfg_overlay=dict(file=...)`) stops with a size mismatch or unexpected keys instead of giving random
layers. `from_pretrained` here takes the same names and gives the packed model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import timm
from safetensors.torch import load_file, save_file
from timm.models import PretrainedCfg
from torch import nn

from ...config import StoMPPConfig
from ...export import (
    checkpoint_format,
    convert_to_packed,
    holds_packed_tensors,
    packed_metadata,
    packed_state_dict,
    read_checkpoint_index,
    read_packed_digests,
    validate_packed_model,
)
from ...nn import BinaryActivation
from ..peft_support import enable_peft_support
from . import birealnet, cifar_resnet  # noqa: F401  (register birealnet18 / 34 and cifar_resnet* with timm)
from .policy import cifar_stem, prepare_vision_model

#: How activation sites are recorded in `stompp_replaced_activations` (training and packed modules).
_STOMPP_ACTIVATIONS = ("StoMPPActivation", "BinaryActivation")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: The `pretrained_cfg` fields timm accepts; `timm.create_model("local-dir:...")` rejects any other key.
PRETRAINED_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))
#: Fields that say where the weights were read from: meaningless in a saved folder (timm sets them when it loads).
_SOURCE_FIELDS = ("file", "source", "state_dict")


def save_pretrained(model: nn.Module, save_directory: str, **extra: Any) -> None:
    """Save a timm model in timm's Hub layout, packed to 1 bit when every binarized tensor is frozen.

    `config.json` holds `architecture`, `num_classes`, `num_features`, `pretrained_cfg` (timm's fields only),
    `model_args` (the `create_model` keyword arguments, from `extra["model_args"]`), `quantization_config` and
    `stompp_cifar_stem` (after `cifar_stem(model)`). A model still in progression saves its latent weights (and
    `quantization_config.packed = false`).
    """
    config: StoMPPConfig | None = getattr(model, "stompp_config", None)
    os.makedirs(save_directory, exist_ok=True)
    model_args = extra.pop("model_args", {})
    info: dict[str, Any] = {
        "architecture": model.pretrained_cfg.get("architecture"),
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "pretrained_cfg": standard_pretrained_cfg(model.pretrained_cfg),
        "model_args": model_args,
        **extra,
    }
    if getattr(model, "stompp_cifar_stem", False):
        info["stompp_cifar_stem"] = True
    if config is not None:
        packed = checkpoint_format(model)[0] == "packed"
        state = packed_state_dict(model, config.export_dtype) if packed else model.state_dict()
        quant = StoMPPConfig.from_dict({**config.to_dict(), "packed": packed}).to_dict()
        info["quantization_config"] = quant
        replaced = getattr(model, "stompp_replaced_activations", [])
        info["stompp_replaced_activations"] = {n: type(model.get_submodule(n)).__name__ for n in replaced}
    else:
        state = model.state_dict()
    state = {k: v.detach().contiguous() for k, v in state.items()}
    metadata = {"format": "pt", **(packed_metadata(state) if config is not None and packed else {})}
    save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata=metadata)
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")


def standard_pretrained_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The fields of `cfg` that timm's `PretrainedCfg` has (and JSON can hold), without where weights came from."""
    return {k: v for k, v in cfg.items() if k in PRETRAINED_CFG_FIELDS and k not in _SOURCE_FIELDS and _jsonable(v)}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def resolve_folder(name: str | os.PathLike) -> str:
    """The local folder of `name`: a folder, `local-dir:<folder>`, or `hf-hub:<repo id>[@revision]` (downloaded with
    `huggingface_hub.snapshot_download`), the names `timm.create_model` takes."""
    name = os.fspath(name)
    source, sep, rest = name.partition(":")
    if sep and source == "local-dir" and rest:
        return rest
    if sep and source in ("hf-hub", "hf_hub") and rest:
        from huggingface_hub import snapshot_download

        repo_id, _, revision = rest.partition("@")
        return snapshot_download(repo_id, revision=revision or None)
    return name


def from_pretrained(path: str | os.PathLike, **model_args: Any) -> nn.Module:
    """Rebuild a model saved by `save_pretrained`: packed `BinaryConv2d` / `BinaryLinear` layers for a packed
    checkpoint (bit-identical outputs in eval mode), StoMPP training layers for a latent one.

    `path` is a folder, `local-dir:<folder>` or `hf-hub:<repo id>[@revision]`; `model_args` override the saved
    `create_model` arguments.
    """
    folder = resolve_folder(path)
    config_file = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{config_file} does not exist: pass a folder written by `stompp_hf.integrations.timm.save_pretrained`, "
            "`local-dir:<folder>` or `hf-hub:<repo id>`."
        )
    with open(config_file) as f:
        info = json.load(f)
    args = {**info.get("model_args", {}), **model_args}
    model = timm.create_model(info["architecture"], pretrained=False, num_classes=info["num_classes"], **args)
    saved_cfg = dict(info["pretrained_cfg"])
    # `cifar_stem` sat in `pretrained_cfg` in checkpoints of stompp_hf up to 0.2.0.dev0
    if info.get("stompp_cifar_stem") or saved_cfg.pop("cifar_stem", False):
        cifar_stem(model)
    # The saved metadata (input size, mean / std, label names, ...) wins over the architecture's defaults.
    model.pretrained_cfg = {**model.pretrained_cfg, **saved_cfg}
    quant = info.get("quantization_config")
    weights = os.path.join(folder, WEIGHTS_NAME)
    if quant is not None:
        config = StoMPPConfig.from_dict(quant)
        replaced = info.get("stompp_replaced_activations", {})
        for name, layer in replaced.items():
            if layer in _STOMPP_ACTIVATIONS:  # an activation site
                if config.packed:
                    original = type(model.get_submodule(name)).__name__
                    model.set_submodule(name, BinaryActivation(config.activation_scale == "tensor", original))
                # latent: `prepare_vision_model` converts the model's own activation again, as in training
            else:
                model.set_submodule(name, getattr(nn, layer)())
        model.stompp_replaced_activations = list(replaced)
        index = read_checkpoint_index([weights])
        if config.packed:
            convert_to_packed(model, config, index)
            model.stompp_config = config
        else:
            packed = holds_packed_tensors(index)
            if packed:
                raise ValueError(
                    f"{weights} holds packed 1-bit tensors (e.g. `{packed[0]}`), but its quantization_config says "
                    "`packed: false`: config.json was edited or belongs to another checkpoint."
                )
            prepare_vision_model(model, config, act_layer=None)
    state = load_file(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {weights} does not match {info['architecture']}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    if quant is not None and config.packed:
        validate_packed_model(model, read_packed_digests([weights]))
        enable_peft_support()
    return model
