"""ResNet-D for photos (96-256 px): a downsampling "deep" stem of three 3x3 convs (stride 2, then a
max-pool: a 128 px photo reaches the first stage at 32 px), average-pool shortcuts where a block
downsamples, and the last BatchNorm of every residual branch zero-initialised so each block starts as
the identity (He et al. 2019, "Bag of Tricks", the D variant; Goyal et al. 2017). Built by timm's
ResNet class, as timm's resnet*d models, with a width multiplier of our own: `width` is the first
stage's channels (64 as in timm; the stages have width, 2, 4 and 8 x width)."""
from __future__ import annotations

import torch.nn as nn

from imgcls.models.registry import register_model


def _resnet_d(layers: list[int], bottleneck: bool, num_classes: int, *, width: int, dropout: float) -> nn.Module:
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    return ResNet(block=Bottleneck if bottleneck else BasicBlock, layers=layers, num_classes=num_classes,
                  stem_width=width // 2, stem_type="deep", avg_down=True, zero_init_last=True,
                  channels=(width, 2 * width, 4 * width, 8 * width), drop_rate=dropout)


@register_model
def resnet18d(num_classes: int, *, width: int = 64, dropout: float = 0.0) -> nn.Module:
    """ResNet-18-D for 96-256 px photos: deep stem + max-pool (stage 1 at 1/4 of the input), basic blocks."""
    return _resnet_d([2, 2, 2, 2], False, num_classes, width=width, dropout=dropout)


@register_model
def resnet26d(num_classes: int, *, width: int = 64, dropout: float = 0.0) -> nn.Module:
    """ResNet-26-D for 96-256 px photos: deep stem, 8 bottleneck blocks."""
    return _resnet_d([2, 2, 2, 2], True, num_classes, width=width, dropout=dropout)


@register_model
def resnet34d(num_classes: int, *, width: int = 64, dropout: float = 0.0) -> nn.Module:
    """ResNet-34-D for 96-256 px photos: deep stem, 16 basic blocks."""
    return _resnet_d([3, 4, 6, 3], False, num_classes, width=width, dropout=dropout)


@register_model
def resnet50d(num_classes: int, *, width: int = 64, dropout: float = 0.0) -> nn.Module:
    """ResNet-50-D for 96-256 px photos: deep stem, 16 bottleneck blocks."""
    return _resnet_d([3, 4, 6, 3], True, num_classes, width=width, dropout=dropout)
