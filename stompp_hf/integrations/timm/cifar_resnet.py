"""CIFAR-layout ResNets (He et al., CVPR 2016, Sec. 4.2) as timm models: the networks of the StoMPP paper's
small-image experiments.

Three stages of `n` BasicBlocks with 16, 32 and 64 channels (ResNet-6n+2: `cifar_resnet8` has n = 1,
`cifar_resnet20` n = 3, `cifar_resnet32` n = 5, `cifar_resnet44` n = 7, `cifar_resnet56` n = 9), a 3x3 stride-1 stem
convolution with 16 channels and no max-pool, stride 2 at the first block of stages 2 and 3 with a 1x1 projection
shortcut (option B), global average pooling and a linear classifier. The blocks are timm's own `BasicBlock`, so the
model has timm's module names (`conv1`, `bn1`, `act1`, `layer{1,2,3}.{i}.conv1` ..., `fc`), `pretrained_cfg`,
`group_matcher` and save / load. `zero_init_last` is off by default: a zero-initialised last BatchNorm makes every
block an identity at the start, so its convolutions receive no gradient, which a binarized block cannot afford.

Importing this module registers the models with timm::

    import stompp_hf.integrations.timm.cifar_resnet  # noqa: F401
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet, make_blocks
from torch import nn

__all__ = ["CifarResNet"]

CHANNELS = (16, 32, 64)


class CifarResNet(ResNet):
    """A ResNet with the CIFAR layout: 3x3 stride-1 stem of `channels[0]`, no max-pool, one stage per entry of
    `layers`. It reuses timm `ResNet`'s head, `group_matcher`, classifier and init methods; only the stem and the
    number of stages differ (timm's `ResNet.__init__` fixes a 64-channel stem and four stages)."""

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 3, 3),
        channels: tuple[int, ...] = CHANNELS,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        zero_init_last: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        if len(layers) != len(channels):
            raise ValueError(f"layers ({list(layers)}) and channels ({list(channels)}) must have the same length")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(channels[0])
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.Identity()
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module="act1")]
        stages, stage_info = make_blocks(
            (BasicBlock,) * len(layers),
            tuple(channels),
            tuple(layers),
            channels[0],
            drop_path_rate=drop_path_rate,
            act_layer=act_layer,
            norm_layer=norm_layer,
        )
        for index, ((name, stage), info) in enumerate(zip(stages, stage_info)):
            self.add_module(name, stage)
            self.feature_info.append({**info, "reduction": 2**index})
        self.stage_names = tuple(name for name, _ in stages)
        self.num_features = self.head_hidden_size = channels[-1]
        self.global_pool, self.fc = create_classifier(self.num_features, self.num_classes, pool_type=global_pool)
        self.init_weights(zero_init_last=zero_init_last)

    def _stages(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.stage_names]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the stages: (B, C, H, W) images -> (B, 64, H/4, W/4) features."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self._stages(), x, flatten=True)
        for stage in self._stages():
            x = stage(x)
        return x


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "first_conv": "conv1",
        "classifier": "fc",
        "paper_ids": "arXiv:1512.03385",
        "paper_name": "Deep Residual Learning for Image Recognition",
        **kwargs,
    }


_DEPTHS = {"cifar_resnet8": 1, "cifar_resnet20": 3, "cifar_resnet32": 5, "cifar_resnet44": 7, "cifar_resnet56": 9}
default_cfgs = generate_default_cfgs({name: _cfg() for name in _DEPTHS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    if pretrained:
        raise RuntimeError(f"No pretrained weights exist for {variant!r}: create it with pretrained=False.")
    n = _DEPTHS[variant]
    kwargs = {"layers": (n, n, n), **kwargs}
    return build_model_with_cfg(CifarResNet, variant, pretrained, feature_cfg={"flatten_sequential": True}, **kwargs)


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-8: one BasicBlock per stage."""
    return _create("cifar_resnet8", pretrained, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20: three BasicBlocks per stage."""
    return _create("cifar_resnet20", pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32: five BasicBlocks per stage."""
    return _create("cifar_resnet32", pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44: seven BasicBlocks per stage."""
    return _create("cifar_resnet44", pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56: nine BasicBlocks per stage."""
    return _create("cifar_resnet56", pretrained, **kwargs)
