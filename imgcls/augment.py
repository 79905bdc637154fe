"""Batch augmentations on the training device.

Every augmentation is a plain function `(images, targets, generator) -> (images, targets)` over a
whole batch: images float [B, 3, H, W] in [0, 1] (before `normalize`), targets soft [B, C].
Each sample draws its own parameters from the generator passed in, so a run is reproducible
and two images in one batch get different parameters.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from imgcls.config import AugConfig

MEAN = (0.485, 0.456, 0.406)  # ImageNet channel statistics; any fixed values work from scratch
STD = (0.229, 0.224, 0.225)

BatchFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] (cache rows) -> float [B, 3, H, W] in [0, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div_(255)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def geometric(images: torch.Tensor, targets: torch.Tensor, g: torch.Generator, *, size: int,
              scale: tuple[float, float], ratio: tuple[float, float], hflip: float, rotate: float,
              translate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop, horizontal flip, rotation and translation as one per-sample affine warp.

    One grid_sample does all four, so the cost does not grow with the number of geometric ops.
    Out-of-image pixels (rotation, translation) are filled by reflection.
    """
    b = images.shape[0]
    area = uniform(b, scale[0], scale[1], g)
    log_ratio = uniform(b, math.log(ratio[0]), math.log(ratio[1]), g)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop side as a fraction of the image side
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (uniform(b, -1, 1, g) * (1 - w))  # crop centre in [-1, 1] coordinates, inside the image
    cy = (uniform(b, -1, 1, g) * (1 - h))
    if translate > 0:
        cx = cx + uniform(b, -2 * translate, 2 * translate, g)
        cy = cy + uniform(b, -2 * translate, 2 * translate, g)
    flip = torch.where(torch.rand(b, generator=g, device=g.device) < hflip, -1.0, 1.0)
    angle = uniform(b, -rotate, rotate, g) * (math.pi / 180) if rotate > 0 else torch.zeros(b, device=g.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([w * flip * cos, -h * sin, cx], dim=1),
        torch.stack([w * flip * sin, h * cos, cy], dim=1),
    ], dim=1).to(images.dtype)
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False), targets


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Integer labels -> soft targets; label smoothing spreads `smoothing` mass over all classes."""
    targets = F.one_hot(labels, num_classes).float()
    if smoothing:
        targets = targets * (1 - smoothing) + smoothing / num_classes
    return targets


def build_train_pipeline(cfg: AugConfig, *, size: int) -> list[BatchFn]:
    """The training augmentation, as an ordered list of batch functions (see `apply`)."""
    steps: list[BatchFn] = [partial(geometric, size=size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                    hflip=cfg.hflip, rotate=cfg.rotate, translate=cfg.translate)]
    return steps


def apply(steps: list[BatchFn], images: torch.Tensor, targets: torch.Tensor,
          g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    for step in steps:
        images, targets = step(images, targets, g)
    return images, targets


def train_views(images_u8: torch.Tensor, targets: torch.Tensor, g: torch.Generator,
                steps: list[BatchFn]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache rows -> augmented images in [0, 1] (not normalized), for training, preview and TTA."""
    return apply(steps, to_float(images_u8), targets, g)


def eval_views(images_u8: torch.Tensor, *, size: int) -> torch.Tensor:
    """Cache rows -> the plain evaluation view in [0, 1] (not normalized)."""
    return resize(to_float(images_u8), size)
