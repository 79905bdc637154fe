"""ResNets for small inputs (32-96 px): a 3x3 stem and no max-pool, so 64 px images keep
their detail (He et al. 2016, the CIFAR variant of section 4.2, with ImageNet's 4-stage widths)."""
from __future__ import annotations

import torch
import torch.nn as nn

from imgcls.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """`stem_stride` 1: every stage sees 4x the pixels of ImageNet's ResNet at the same input (for 32-48 px);
    2: the stem halves the image once, no max-pool (for 64-96 px: a 64 px image reaches stage 1 at 32 px
    where ImageNet's stride-4 stem would leave 16)."""

    def __init__(self, blocks: list[int], num_classes: int, *, width: int = 64, dropout: float = 0.0,
                 stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))
        # Zero the last BN of each residual branch: every block starts as identity (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@register_model
def resnet18s(num_classes: int, *, width: int = 64, dropout: float = 0.0) -> nn.Module:
    """ResNet-18 for 32-48 px: 3x3 stem, no downsampling before stage 1 (the CIFAR layout)."""
    return SmallResNet([2, 2, 2, 2], num_classes, width=width, dropout=dropout)


@register_model
def resnet34s(num_classes: int, *, width: int = 64, dropout: float = 0.0) -> nn.Module:
    """ResNet-34 for 32-48 px: 3x3 stem, no downsampling before stage 1."""
    return SmallResNet([3, 4, 6, 3], num_classes, width=width, dropout=dropout)


@register_model
def resnet18s2(num_classes: int, *, width: int = 64, dropout: float = 0.0) -> nn.Module:
    """ResNet-18 for 64-96 px: a stride-2 3x3 stem, no max-pool (stage 1 at half the input)."""
    return SmallResNet([2, 2, 2, 2], num_classes, width=width, dropout=dropout, stem_stride=2)
