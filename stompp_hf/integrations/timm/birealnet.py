"""Bi-Real Net 18 / 34 as timm models (Liu et al., ECCV 2018, arXiv:1808.00278).

Bi-Real Net is a ResNet-18/34 layout in which every 3x3 convolution is its own residual unit with a real-valued
identity shortcut::

    out = bn(conv3x3(act(x))) + shortcut(x)

so the real-valued activations flowing through the shortcuts survive the binarization of each conv's input. The
stages hold [4, 4, 4, 4] (Bi-Real-18) or [6, 8, 12, 6] (Bi-Real-34) such units with 64, 128, 256 and 512 channels;
the first unit of stages 2-4 has stride 2 and a full-precision "Bi-Real downsample" shortcut
(AvgPool2d 2x2 stride 2 -> conv1x1 -> BatchNorm). The conv / BN / downsample shapes are exactly those of ResNet-18/34,
so the parameter counts are identical (11,689,512 and 21,797,672 at 1000 classes).

The model holds plain float `nn.Conv2d` layers and no sign function of its own: `stompp_hf.prepare_model` later
swaps the 3x3 convs for `StoMPPConv2d`, which binarizes the conv's input and weight. By default there is no
activation between units (the binarizer's sign is the nonlinearity); `act_layer` (e.g. `nn.Hardtanh`, `nn.ReLU`) is
applied to each unit's input before its conv to build a real-valued baseline. The shortcut always carries the
unmodified unit input.

Module names follow timm's ResNet (`conv1`, `bn1`, `act1`, `maxpool`, `layer1`..`layer4`, `global_pool`, `fc`), each
unit is `layer{s}.{i}` with submodules `act`, `conv`, `bn` and (where present) `downsample`.

Importing this module registers `birealnet18` and `birealnet34` with timm::

    import stompp_hf.integrations.timm.birealnet  # noqa: F401
    model = timm.create_model("birealnet18", num_classes=10)

No pretrained weights exist: `pretrained=True` raises unless a weight source is supplied explicitly (e.g.
`pretrained_cfg_overlay=dict(file="birealnet18.safetensors")`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, get_act_layer
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["BiRealBlock", "BiRealNet", "birealnet18", "birealnet34"]

LayerType = str | Callable[..., nn.Module] | None

_STAGE_CHANNELS = (64, 128, 256, 512)


def _resolve_act(act_layer: LayerType) -> Callable[..., nn.Module]:
    """An activation class from a class, a factory, a timm activation name, or None (identity)."""
    if act_layer is None:
        return nn.Identity
    if isinstance(act_layer, str):
        if act_layer.lower() in ("hardtanh", "hard_tanh"):  # not among timm's activation names
            return nn.Hardtanh
        return get_act_layer(act_layer)
    return act_layer


def _make_act(act_layer: LayerType) -> nn.Module:
    """Instantiate an activation, never in place: the residual units keep their input for the shortcut."""
    act = _resolve_act(act_layer)()
    if getattr(act, "inplace", False):
        act.inplace = False
    return act


class BiRealBlock(nn.Module):
    """One Bi-Real unit: `bn(conv3x3(act(x))) + shortcut(x)`.

    The shortcut is the identity, or (when the stride or the channel count changes) the full-precision Bi-Real
    downsample `AvgPool2d(2, 2) -> conv1x1 -> BatchNorm`, stored as `downsample`. The pooling uses `ceil_mode=True`
    and `count_include_pad=False` so its output size equals the strided 3x3 conv's on odd inputs too; on even inputs
    it is the plain 2x2 average.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        act_layer: LayerType = nn.Identity,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        """Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: stride of the 3x3 conv (1 or 2).
        act_layer: activation applied to the unit's input before the conv (identity by default).
        norm_layer: normalization after the conv and in the downsample shortcut.
        """
        super().__init__()
        self.act = _make_act(act_layer)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn = norm_layer(out_chs)
        if stride != 1 or in_chs != out_chs:
            pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
            self.downsample: nn.Module | None = nn.Sequential(
                pool, nn.Conv2d(in_chs, out_chs, kernel_size=1, bias=False), norm_layer(out_chs)
            )
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`bn(conv(act(x))) + shortcut(x)`."""
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.bn(self.conv(self.act(x))) + shortcut


class BiRealNet(nn.Module):
    """Bi-Real Net: a ResNet layout of single-conv residual units with real-valued shortcuts.

    Its design binarizes each conv's own input and keeps the residual stream real, so StoMPP converts it with
    `activation_sites="input"` by default (`stompp_activation_sites`).

    Stem: conv 7x7 stride 2 -> BN -> `stem_act_layer` (identity by default, as in Bi-Real Net) -> max-pool 3x3
    stride 2. Four stages of `BiRealBlock` units (`layers` units each), the first unit of stages 2-4 with stride 2.
    Head: global pooling -> dropout (`drop_rate`) -> fc.
    """

    #: Read by the timm policy: the default `activation_sites` of this architecture.
    stompp_activation_sites = "input"

    def __init__(
        self,
        layers: tuple[int, ...] | list[int] = (4, 4, 4, 4),
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        act_layer: LayerType = nn.Identity,
        stem_act_layer: LayerType = nn.Identity,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        channels: tuple[int, ...] | list[int] = _STAGE_CHANNELS,
        stem_chs: int = 64,
    ) -> None:
        """Args:
        layers: number of single-conv units per stage ([4, 4, 4, 4] for Bi-Real-18, [6, 8, 12, 6] for -34).
        num_classes: classifier outputs; 0 removes the classifier (`forward` returns pooled features).
        in_chans: input image channels.
        global_pool: timm global pooling type ("avg", "max", "avgmax", "catavgmax", "" for none).
        drop_rate: dropout before the classifier.
        act_layer: activation applied to each unit's input before its conv (class, factory or name; default
            identity, the binary setting where the binarizer's sign is the nonlinearity).
        stem_act_layer: activation after the stem BN (default identity, as in Bi-Real Net: a ReLU here would make
            every input of the first binarized conv non-negative, so its sign would be constant).
        norm_layer: normalization layer.
        channels: output channels of the four stages.
        stem_chs: output channels of the stem conv.
        """
        super().__init__()
        if len(layers) != len(channels):
            raise ValueError(f"layers ({list(layers)}) and channels ({list(channels)}) must have the same length")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, stem_chs, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem_chs)
        self.act1 = _make_act(stem_act_layer)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info: list[dict[str, Any]] = [dict(num_chs=stem_chs, reduction=2, module="act1")]

        in_chs, reduction = stem_chs, 4
        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(layers)))
        for stage_idx, (depth, out_chs) in enumerate(zip(layers, channels)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            units = []
            for unit_idx in range(depth):
                units.append(BiRealBlock(in_chs, out_chs, stride if unit_idx == 0 else 1, act_layer, norm_layer))
                in_chs = out_chs
            self.add_module(self.stage_names[stage_idx], nn.Sequential(*units))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=self.stage_names[stage_idx]))

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(self.num_features, self.num_classes, pool_type=global_pool)
        self.init_weights()

    def init_weights(self) -> None:
        """He (fan-out) init for convs, unit scale / zero shift for norms, timm's default for the classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stages(self) -> list[nn.Sequential]:
        return [getattr(self, n) for n in self.stage_names]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters for `timm.models.group_modules` / `group_parameters`.

        The stem is group 0, then one group per stage (`coarse=True`) or one per single-conv unit (`coarse=False`),
        in forward order; the classifier falls in a final unmatched group.
        """
        return dict(
            stem=r"^conv1|^bn1|^act1|^maxpool",
            blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)",
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable activation checkpointing, per unit, in `forward_features`."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The classifier module (or its name, "fc")."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for `num_classes` (0: none); keep the pooling unless given."""
        ref = self.conv1.weight
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.global_pool.to(device=ref.device)
        self.fc.to(device=ref.device, dtype=ref.dtype)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediate-feature API: feature 0 is the stem output (before max-pool), 1-4 the stage outputs.

        Args:
            x: input images.
            indices: take the last n features if an int, all if None, the listed indices if a list.
            norm: unused (the model has no final norm); accepted for API compatibility.
            stop_early: stop after the last requested feature.
            output_fmt: only "NCHW".
            intermediates_only: return only the list of intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        intermediates = []
        x = self._stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = self._stages()[:max_index] if stop_early else self._stages()
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and head) not needed for the requested intermediates; return the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Sequential())
        if max_index == 0:
            self.maxpool = nn.Identity()
        if max_index < len(self.stage_names):
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the four stages: (B, C, H, W) images -> (B, 512, H/32, W/32) features."""
        x = self.maxpool(self._stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self._stages(), x, flatten=True)
        else:
            for stage in self._stages():
                x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling, dropout and (unless `pre_logits`) the classifier."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (or pooled features when `num_classes == 0`)."""
        return self.forward_head(self.forward_features(x))


def _has_weight_source(variant: str, kwargs: dict[str, Any]) -> bool:
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    return bool(cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict)


def _create_birealnet(variant: str, pretrained: bool = False, **kwargs: Any) -> BiRealNet:
    if pretrained and not _has_weight_source(variant, kwargs):
        raise RuntimeError(
            f"No pretrained weights exist for {variant!r}: create it with pretrained=False, or give a checkpoint "
            f"explicitly with pretrained_cfg_overlay=dict(file=...)."
        )
    return build_model_with_cfg(BiRealNet, variant, pretrained, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "paper_ids": "arXiv:1808.00278",
        "paper_name": "Bi-Real Net: Enhancing the Performance of 1-bit CNNs With Improved Representational "
        "Capability and Advanced Training Algorithm",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"birealnet18": _cfg(), "birealnet34": _cfg()})


@register_model
def birealnet18(pretrained: bool = False, **kwargs: Any) -> BiRealNet:
    """Bi-Real Net 18: [4, 4, 4, 4] single-conv units (ResNet-18's convs, each with its own shortcut)."""
    return _create_birealnet("birealnet18", pretrained, **{"layers": (4, 4, 4, 4), **kwargs})


@register_model
def birealnet34(pretrained: bool = False, **kwargs: Any) -> BiRealNet:
    """Bi-Real Net 34: [6, 8, 12, 6] single-conv units (ResNet-34's convs, each with its own shortcut)."""
    return _create_birealnet("birealnet34", pretrained, **{"layers": (6, 8, 12, 6), **kwargs})
