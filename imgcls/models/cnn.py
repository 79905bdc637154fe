"""Compact residual CNNs: fast to train from scratch on small data (after airbench's ResNet-9)."""
from __future__ import annotations

import torch
import torch.nn as nn

from imgcls.models.registry import register_model


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResCNN(nn.Module):
    """conv -> [conv, max-pool, (residual)] per stage -> global max-pool -> linear.

    Each stage halves the resolution; `downsample` extra stride-2 stages first bring large
    inputs (128-224 px photos) down to the 32-64 px the stages are sized for."""

    def __init__(self, num_classes: int, *, widths: list[int], residual: list[bool], dropout: float = 0.0):
        super().__init__()
        layers = [conv_bn(3, widths[0])]
        cin = widths[0]
        for cout, res in zip(widths[1:], residual):
            layers += [conv_bn(cin, cout), nn.MaxPool2d(2)]
            if res:
                layers.append(Residual(cout))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model
def resnet9(num_classes: int, *, width: int = 64, dropout: float = 0.0) -> nn.Module:
    """airbench-style ResNet-9: widths w, 2w, 4w, 8w with residual blocks after stages 1 and 3."""
    return ResCNN(num_classes, widths=[width, 2 * width, 4 * width, 8 * width], residual=[True, False, True],
                  dropout=dropout)


@register_model
def tinycnn(num_classes: int, *, width: int = 16, dropout: float = 0.0) -> nn.Module:
    """A few thousand parameters: for the demo, tests and CPU smoke runs."""
    return ResCNN(num_classes, widths=[width, width, 2 * width, 4 * width], residual=[True, False, False],
                  dropout=dropout)
