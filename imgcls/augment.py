"""Batch augmentations on the training device.

Every augmentation is a plain function `(images, targets, generator) -> (images, targets)` over a
whole batch, targets soft [B, C]. Images enter as the uint8 cache rows viewed as [B, 3, H, W]; the
steps before `colour` pass them on as uint8 or float in [0, 1], `colour` (always in the pipeline)
ends in the normalization and returns the model's input, float [B, 3, size, size]; the steps after
it (erasing, mixing) act on normalized images. Each sample draws its own parameters from the
generator passed in, so a run is reproducible and two images in one batch get different parameters.

Why not a library's augmentation modules: kornia.augmentation draws every parameter from torch's
global RNG (no per-call generator: `generator=` raises, see kornia/augmentation/_2d/base.py, kornia
issue #4427), and its RandAugment/TrivialAugment pick the ops once per batch;
torchvision.transforms.v2 draws one parameter set per call, so a whole batch gets the same crop and
jitter. We draw the parameters here from the passed generator and run them through the libraries'
functional ops that take per-sample parameters: on the GPU torch's grid_sample and bmm, kornia.enhance
and torchvision's autocontrast; on the CPU, OpenCV's uint8 resize / warpAffine and its per-pixel
affine colour transform, one image per call on one thread per core (OpenCV releases the GIL).
Timings quoted below: B=128 images at 128 px on a 2-core CPU, from
`python benchmarks/pipeline.py --components`.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.config import AugConfig
from imgcls.errors import UserError

MEAN = (0.485, 0.456, 0.406)  # ImageNet channel statistics; any fixed values work from scratch
STD = (0.229, 0.224, 0.225)
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as PIL's convert("L") and torchvision's rgb_to_grayscale

BatchFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


def chance(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    """n booleans, each True with probability p."""
    return torch.rand(n, generator=g, device=g.device) < p


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] (cache rows) -> float [B, 3, H, W] in [0, 1]."""
    return as_float(images_u8.permute(0, 3, 1, 2))


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [0, 1], contiguous NCHW; float images pass through.

    Converting straight to NCHW is one pass (2.2 ms per batch); `.float()` on the channels-last view
    of the cache is quicker to convert (1.2 ms) but keeps that layout, which the NCHW ops after it
    (bmm over [B, 3, H*W], grid_sample, normalize) do not expect."""
    if images.is_floating_point():
        return images
    return images.to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the model's input, (images - MEAN) / STD per channel."""
    scale = torch.tensor([1 / s for s in STD], device=images.device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=images.device).view(1, 3, 1, 1)
    return torch.mul(images, scale).add_(shift)  # 1.0 ms per batch, addcmul 2.6 ms


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """The model's input -> [0, 1] (for showing it)."""
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return images * std + torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# --- per image, on the CPU ---------------------------------------------------------------------

@cache
def _opencv():
    import cv2

    cv2.setNumThreads(1)  # once per process: per_image spreads images over threads; OpenCV's own pool on top oversubscribes
    return cv2


def per_image(fn: Callable[[int], None], n: int) -> None:
    """fn(i) for i in range(n), spread over one Python thread per torch CPU thread. One image is too
    small to split over cores, and the OpenCV calls in fn release the GIL, so the threads overlap.
    Only for calls of ~50 us and more (a resize): lighter ones (cv2.mean, cv2.transform, 5-20 us an
    image) ran slower on 2 threads than in a plain loop, the GIL hand-offs costing more than they save."""
    threads = max(1, min(torch.get_num_threads(), n // 16))
    if threads == 1:
        for i in range(n):
            fn(i)
        return
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="imgcls-augment")
    list(_POOLS[threads].map(lambda k: [fn(i) for i in range(k, n, threads)], range(threads)))  # re-raises


_POOLS: dict[int, ThreadPoolExecutor] = {}  # kept between batches: starting threads costs ~0.3 ms a batch


def _nhwc(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> contiguous [B, H, W, 3] (no copy for the cache rows' view or the crop step's output)."""
    return images.permute(0, 2, 3, 1).contiguous()


def _from_nhwc(images: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] -> [B, 3, H, W] in channels-last memory, as the model takes it on the CPU."""
    return images.permute(0, 3, 1, 2)


# --- geometric ---------------------------------------------------------------------------------

def geometric(images: torch.Tensor, targets: torch.Tensor, g: torch.Generator, *, size: int,
              scale: tuple[float, float], ratio: tuple[float, float], hflip: float, rotate: float,
              translate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop, horizontal flip, rotation and translation, per sample, to [B, 3, size, size].

    On the GPU (float or uint8 in, float out) one per-sample affine warp (grid_sample) does all four,
    so the cost does not grow with the number of geometric ops; out-of-image pixels are filled by
    reflection. On the CPU (uint8 in, uint8 out) OpenCV works per image: crop and flip alone take one
    integer crop box per image as torchvision's RandomResizedCrop and resize it (cv2.resize: bilinear,
    area averaging when the box shrinks on both sides); with rotation or translation, cv2.warpAffine
    runs the GPU path's affine map. 128 crops of the 128 px food-10 cache to 128 px, on a 2-core AMD
    EPYC VM (`benchmarks/pipeline.py --components`, 2026-11-29): crop + flip 7.3-8.8 ms, with rotation
    and translation 20.2 ms, against 48-50 ms for grid_sample and 32-33 ms for kornia's
    RandomResizedCrop + RandomHorizontalFlip; torch's uint8 antialiased resize, our previous CPU
    path, took 1.5-2x OpenCV's time for the same crops. Both paths draw the same parameters.
    """
    b, side = images.shape[0], images.shape[-2]
    w, h = crop_sides(b, scale, ratio, g, side=side)
    ux, uy = torch.rand(2, b, generator=g, device=g.device)  # where the crop sits: 0 = left/top edge, 1 = right/bottom
    cx, cy = (2 * ux - 1) * (1 - w), (2 * uy - 1) * (1 - h)  # crop centre in [-1, 1] coordinates
    if translate > 0:
        cx = cx + uniform(b, -2 * translate, 2 * translate, g)
        cy = cy + uniform(b, -2 * translate, 2 * translate, g)
    flip = torch.where(torch.rand(b, generator=g, device=g.device) < hflip, -1.0, 1.0)
    cpu = images.dtype == torch.uint8 and images.device.type == "cpu"
    if cpu and rotate == 0 and translate == 0:
        return _crop_resize_cv2(images, size=size, w=w, h=h, ux=ux, uy=uy, flip=flip < 0), targets
    angle = uniform(b, -rotate, rotate, g) * (math.pi / 180) if rotate > 0 else torch.zeros(b, device=g.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([w * flip * cos, -h * sin, cx], dim=1),
        torch.stack([w * flip * sin, h * cos, cy], dim=1),
    ], dim=1)
    if cpu:
        return _warp_cv2(images, theta, size=size), targets
    return warp(as_float(images), theta, size=size, fill="reflection"), targets


def crop_sides(b: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator, *,
               side: int, tries: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-resized-crop width and height as fractions (at most 1) of the square image's `side`
    pixels, drawn as torchvision's RandomResizedCrop.get_params and timm's
    RandomResizedCropAndInterpolation: up to `tries` (area, log-aspect) candidates per image, the
    first whose sides, rounded to pixels, both fit, else the whole image. Clamping a candidate that
    does not fit instead of drawing again favours large crops (mean area 0.667 against 0.621 at scale
    (0.35, 1)); testing the fit before rounding to pixels favours small ones (0.615 at 64 px): both
    are augmentations other than the one timm and torchvision users know (issue 7)."""
    area = uniform(b * tries, scale[0], scale[1], g).view(b, tries)
    aspect = torch.exp(uniform(b * tries, math.log(ratio[0]), math.log(ratio[1]), g)).view(b, tries)
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = ((w * side).round() <= side) & ((h * side).round() <= side)
    first = fits.int().argmax(1, keepdim=True)  # the first candidate that fits (0 when none does)
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1).clamp(max=1), 1.0)
    h = torch.where(found, h.gather(1, first).squeeze(1).clamp(max=1), 1.0)
    return w, h


def crop_boxes(w: torch.Tensor, h: torch.Tensor, ux: torch.Tensor, uy: torch.Tensor, *,
               side: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) pixel boxes as torchvision's get_params makes them: the sides
    (fractions of `side`) rounded to pixels, the offsets uniform over the side - width + 1 positions
    that fit (ux, uy in [0, 1))."""
    boxes = []
    for wi, hi, x, y in zip(w.tolist(), h.tolist(), ux.tolist(), uy.tolist()):
        cw, ch = max(1, round(wi * side)), max(1, round(hi * side))
        boxes.append((min(side - ch, int(y * (side - ch + 1))), min(side - cw, int(x * (side - cw + 1))), ch, cw))
    return boxes


def _crop_resize_cv2(images: torch.Tensor, *, size: int, w, h, ux, uy, flip) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> uint8 [B, 3, size, size] (channels-last memory): per-image integer crop
    box, resized and flipped by OpenCV straight into the batch."""
    cv2 = _opencv()
    src = _nhwc(images).numpy()
    boxes = crop_boxes(w, h, ux, uy, side=src.shape[1])
    flips = flip.tolist()
    out = torch.empty(len(src), size, size, 3, dtype=torch.uint8)
    dst = out.numpy()

    def crop(i: int) -> None:
        top, left, ch, cw = boxes[i]
        box = src[i, top:top + ch, left:left + cw]
        mode = cv2.INTER_AREA if ch >= size and cw >= size else cv2.INTER_LINEAR  # area: antialiased shrink
        cv2.resize(box, (size, size), dst=dst[i], interpolation=mode)
        if flips[i]:
            cv2.flip(dst[i], 1, dst=dst[i])

    per_image(crop, len(src))
    return _from_nhwc(out)


def _warp_cv2(images: torch.Tensor, theta: torch.Tensor, *, size: int) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> uint8 [B, 3, size, size] (channels-last memory): the affine map theta
    [B, 2, 3] of `warp` (output -> input, [-1, 1] coordinates, align_corners=False), bilinear,
    reflected at the border as grid_sample's padding_mode="reflection"."""
    cv2 = _opencv()
    src = _nhwc(images).numpy()
    side = src.shape[1]
    # pixel centre u of n pixels <-> (2u + 1) / n - 1; theta acts between those coordinates
    out_to_unit = torch.tensor([[2 / size, 0, 1 / size - 1], [0, 2 / size, 1 / size - 1], [0, 0, 1]],
                               dtype=torch.float64)
    unit_to_in = torch.tensor([[side / 2, 0, (side - 1) / 2], [0, side / 2, (side - 1) / 2]], dtype=torch.float64)
    full = torch.cat([theta.double().cpu(), torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64).expand(len(src), 1, 3)], 1)
    maps = (unit_to_in @ full @ out_to_unit).numpy()  # [B, 2, 3]: output pixel -> input pixel
    out = torch.empty(len(src), size, size, 3, dtype=torch.uint8)
    dst = out.numpy()
    per_image(lambda i: cv2.warpAffine(src[i], maps[i], (size, size), dst=dst[i], borderMode=cv2.BORDER_REFLECT,
                                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP), len(src))
    return _from_nhwc(out)


def warp(images: torch.Tensor, theta: torch.Tensor, *, size: int, fill: str) -> torch.Tensor:
    """Per-sample affine warp: theta [B, 2, 3] maps output to input in [-1, 1] coordinates."""
    grid = F.affine_grid(theta.to(images.dtype), [len(images), 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=fill, align_corners=False)


# --- colour ------------------------------------------------------------------------------------

def _yiq_hue_rotations(turns: torch.Tensor) -> torch.Tensor:
    """[B] fractions of a turn -> [B, 3, 3] RGB matrices that rotate the chroma plane of YIQ space
    and keep luma: a linear hue shift (torchvision's HSV hue shift is not linear)."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       dtype=torch.float64, device=turns.device)
    a = turns.double() * 2 * math.pi
    cos, sin, one, zero = torch.cos(a), torch.sin(a), torch.ones_like(a), torch.zeros_like(a)
    rot = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                       torch.stack([zero, sin, cos], 1)], 1)
    return (torch.linalg.inv(yiq) @ rot @ yiq).float()


def colour(images: torch.Tensor, targets: torch.Tensor, g: torch.Generator, *, brightness: float = 0.0,
           contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
           grayscale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour jitter (torchvision ColorJitter's factors), greyscale with probability `grayscale`, then
    the normalization, as ONE affine colour map per image: uint8 or [0, 1] in, the model's input out.
    Every pipeline ends its image steps here, with all factors 0 too (then only the normalization
    runs and nothing is drawn).

    Brightness, contrast, saturation, a YIQ hue rotation and greyscale are all affine in RGB, and
    contrast's mean grey follows from the channel means, so the chain composes exactly into a 3x3
    matrix and an offset per image (see `_jitter`). The one difference from torchvision: values are
    clamped to [0, 1] once at the end, not after each factor, so the order of the factors, which
    torchvision draws per call, does not change the result. On the CPU from uint8, OpenCV's
    per-pixel transform maps each image to uint8 (clamping and rounding, as PIL-based jitter does)
    and one tiled multiply-add normalizes the batch; on float images (the GPU, or after a policy
    step) one bmm over the batch. Jitter + normalization of 128 images at 128 px on a 2-core CPU:
    see `_normalized_colour_map`.
    """
    if not (brightness or contrast or saturation or hue or grayscale):
        return _normalized_colour_map(images, None, None), targets
    m, pull = _jitter(len(images), g, images.device, brightness=brightness, contrast=contrast,
                      saturation=saturation, hue=hue, grayscale=grayscale)
    return _normalized_colour_map(images, m, pull if contrast > 0 else None), targets


def _jitter(b: int, g: torch.Generator, device: torch.device, *, brightness: float, contrast: float,
            saturation: float, hue: float, grayscale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image colour maps on [0, 1] RGB, x -> m x + pull * mean_grey (m [B, 3, 3], pull [B]),
    mean_grey being the mean luma of the image the map is applied to.

    With luma weights w (summing to 1), saturation S = s I + (1 - s) 1 w^T and the YIQ hue rotation
    H both keep luma (w^T S = w^T H = w^T) and greys (S 1 = H 1 = 1), and contrast
    x -> c x + (1 - c) mean_grey 1 blends towards a grey that brightness scales and S, H keep. So the
    four factors commute: in any order the map is x -> b c H S x + (1 - c) b mean_grey 1
    (tests/test_augment.py checks this against the factors applied one by one in a random order).
    Greyscale G = 1 w^T after them keeps the offset (G 1 = 1)."""
    ones = torch.ones(b, device=g.device)

    def factor(strength: float) -> torch.Tensor:
        return uniform(b, max(0.0, 1 - strength), 1 + strength, g) if strength > 0 else ones

    bri, con, sat = factor(brightness), factor(contrast), factor(saturation)
    turns = uniform(b, -hue, hue, g) if hue > 0 else None
    grey = chance(b, grayscale, g) if grayscale > 0 else None
    bri, con, sat = bri.to(device), con.to(device), sat.to(device)

    to_grey = torch.tensor(GREY, device=device).expand(3, 3)  # every output channel = luma
    m = sat[:, None, None] * torch.eye(3, device=device) + (1 - sat)[:, None, None] * to_grey
    if turns is not None:
        m = _yiq_hue_rotations(turns.to(device)) @ m
    m = (bri * con)[:, None, None] * m
    if grey is not None:
        m = torch.where(grey.to(device)[:, None, None], to_grey @ m, m)
    return m, (1 - con) * bri


def _normalized_colour_map(images: torch.Tensor, m: torch.Tensor | None, pull: torch.Tensor | None) -> torch.Tensor:
    """uint8 or [0, 1] images -> normalize(clamp(m x + pull * mean_grey(x), 0, 1)) per image;
    m = None: normalize alone; pull = None: no offset.

    128 images at 128 px on a 2-core AMD EPYC VM (`benchmarks/pipeline.py --components`,
    2026-11-29): from the uint8 crops, b/c/s 0.2 + hue 0.05 + normalize 7.9-10.7 ms (OpenCV's
    mean + transform per image, uint8 -> uint8, and the tiled multiply-add: 3.2-4.0 ms of it), the
    normalization alone 4.0 ms. The bmm path needs float input (+3.5 ms from uint8) and gives planar
    output, which the model then wants copied to channels-last (+2.5 ms); a float OpenCV transform
    with a per-channel clamp took 6-9 ms before the normalization."""
    if images.dtype == torch.uint8 and images.device.type == "cpu":
        nhwc = _nhwc(images)
        if m is not None:
            nhwc = torch.from_numpy(_colour_map_cv2(nhwc.numpy(), m, pull))
        return _normalize_nhwc(nhwc)
    images = as_float(images)
    if m is None:
        return normalize(images)
    b = len(images)
    mean, std, w = (torch.tensor(t, device=m.device) for t in (MEAN, STD, GREY))
    v = (pull * (images.mean((2, 3)) @ w))[:, None].expand(b, 3) if pull is not None else torch.zeros(b, 3, device=m.device)
    m, v = m / std[:, None], (v - mean) / std  # the normalization, folded into the map
    lo, hi = [-a / s for a, s in zip(MEAN, STD)], [(1 - a) / s for a, s in zip(MEAN, STD)]  # 0 and 1, normalized
    out = torch.bmm(m, images.reshape(b, 3, -1)).add_(v[:, :, None]).view(b, 3, *images.shape[2:])
    for c in range(3):  # a scalar clamp per channel: one clamp with [1, 3, 1, 1] bounds took 5x longer on the CPU
        out[:, c].clamp_(lo[c], hi[c])
    return out


def _colour_map_cv2(src: np.ndarray, m: torch.Tensor, pull: torch.Tensor | None) -> np.ndarray:
    """uint8 [B, H, W, 3] -> uint8 clamp(m x + pull * mean_grey(x)), one image per OpenCV call
    (cv2.transform saturates to 0..255 and rounds, as PIL-based jitter does)."""
    cv2 = _opencv()
    maps = torch.cat([m, torch.zeros(len(m), 3, 1, device=m.device)], 2).float().cpu().numpy()  # [B, 3, 4]
    pulls = pull.float().cpu().numpy() if pull is not None else None
    out = np.empty_like(src)

    for i in range(len(src)):  # a plain loop: see per_image
        if pulls is not None:
            maps[i, :, 3] = pulls[i] * np.dot(cv2.mean(src[i])[:3], GREY)  # on 0..255 values
        cv2.transform(src[i], maps[i], dst=out[i])
    return out


def _normalize_nhwc(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalized float [B, 3, H, W] in channels-last memory. The per-channel
    constants are tiled along a whole row ([W * 3]): broadcasting a [3] over the last axis runs
    several times slower on the CPU."""
    b, h, w, _ = images.shape
    scale = torch.tensor([1 / (255 * s) for s in STD], device=images.device).repeat(w)
    shift = torch.tensor([-a / s for a, s in zip(MEAN, STD)], device=images.device).repeat(w)
    out = images.reshape(b * h, w * 3).float().mul_(scale).add_(shift)
    return out.view(b, h, w, 3).permute(0, 3, 1, 2)


def _colour_map(images: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> clamp(m x + v, 0, 1), per image (the policy's colour ops)."""
    b = len(images)
    # bmm then add_: baddbmm first copies the broadcast offset into a new batch (2.8 ms against 2.3 ms)
    return torch.bmm(m, images.reshape(b, 3, -1)).add_(v[:, :, None]).clamp_(0, 1).view(images.shape)


# --- RandAugment / TrivialAugment, per sample ---------------------------------------------------
# The op spaces of torchvision's RandAugment and TrivialAugmentWide (_augmentation_space): each op
# gets a signed magnitude (random sign where `signed`), `top` at the highest of 31 bins. Ops that
# need an image-wide statistic or a kernel come from kornia.enhance, which takes one parameter per
# image; geometric ops fill with black as torchvision's.

def _affine_op(build: Callable[[torch.Tensor], list[list[torch.Tensor]]]):
    def op(images: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        theta = torch.stack([torch.stack(row, 1) for row in build(mag)], 1)
        return warp(images, theta, size=images.shape[-1], fill="zeros")
    return op


def _rotation(deg: torch.Tensor) -> list[list[torch.Tensor]]:
    a, z = deg * (math.pi / 180), torch.zeros_like(deg)
    return [[torch.cos(a), -torch.sin(a), z], [torch.sin(a), torch.cos(a), z]]


def _shear(s: torch.Tensor, axis: int) -> list[list[torch.Tensor]]:
    one, z = torch.ones_like(s), torch.zeros_like(s)
    return [[one, s, z], [z, one, z]] if axis == 0 else [[one, z, z], [s, one, z]]


def _translation(t: torch.Tensor, axis: int) -> list[list[torch.Tensor]]:
    one, z = torch.ones_like(t), torch.zeros_like(t)
    return [[one, z, 2 * t], [z, one, z]] if axis == 0 else [[one, z, z], [z, one, 2 * t]]  # t: fraction of the side


def _blend_op(kind: str):
    """PIL ImageEnhance Brightness/Color/Contrast with factor 1 + mag, as an affine colour map."""
    def op(images: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        f, b, w = 1 + mag, len(images), torch.tensor(GREY, device=images.device)
        eye, to_grey = torch.eye(3, device=images.device).expand(b, 3, 3), w.expand(3, 3)
        zero = torch.zeros(b, 3, device=images.device)
        if kind == "brightness":
            return _colour_map(images, f[:, None, None] * eye, zero)
        if kind == "color":
            return _colour_map(images, f[:, None, None] * eye + (1 - f)[:, None, None] * to_grey, zero)
        mean_grey = images.mean((2, 3)) @ w
        return _colour_map(images, f[:, None, None] * eye, ((1 - f) * mean_grey)[:, None].expand(b, 3))
    return op


def _kornia(name: str, param: Callable[[torch.Tensor], torch.Tensor] | None = None):
    def op(images: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        import kornia.enhance

        fn = getattr(kornia.enhance, name)
        return fn(images) if param is None else fn(images, param(mag))
    return op


def _autocontrast(images: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    import torchvision.transforms.v2.functional as TF

    return TF.autocontrast(images)  # per image and channel: min -> 0, max -> 1


@dataclass(frozen=True)
class PolicyOp:
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images [n, 3, H, W], magnitude [n]) -> images
    randaugment: float  # magnitude at the top bin in RandAugment
    trivialaugment: float  # ... in TrivialAugmentWide
    signed: bool = False


POLICY_OPS = {
    "identity": PolicyOp(lambda x, m: x, 0, 0),
    "shear_x": PolicyOp(_affine_op(lambda m: _shear(m, 0)), 0.3, 0.99, signed=True),
    "shear_y": PolicyOp(_affine_op(lambda m: _shear(m, 1)), 0.3, 0.99, signed=True),
    # fraction of the side: 150/331 as torchvision's RandAugment; TrivialAugmentWide's 32 px at 128 px
    "translate_x": PolicyOp(_affine_op(lambda m: _translation(m, 0)), 150 / 331, 0.25, signed=True),
    "translate_y": PolicyOp(_affine_op(lambda m: _translation(m, 1)), 150 / 331, 0.25, signed=True),
    "rotate": PolicyOp(_affine_op(_rotation), 30, 135, signed=True),  # degrees
    "brightness": PolicyOp(_blend_op("brightness"), 0.9, 0.99, signed=True),
    "color": PolicyOp(_blend_op("color"), 0.9, 0.99, signed=True),
    "contrast": PolicyOp(_blend_op("contrast"), 0.9, 0.99, signed=True),
    "sharpness": PolicyOp(_kornia("sharpness", lambda m: 1 + m), 0.9, 0.99, signed=True),
    "posterize": PolicyOp(_kornia("posterize", lambda m: 8 - m.round().long()), 4, 6),  # bits dropped
    "solarize": PolicyOp(_kornia("solarize", lambda m: (1 - m).clamp(0, 1)), 1.0, 1.0),  # threshold 1 - m
    "autocontrast": PolicyOp(_autocontrast, 0, 0),
    "equalize": PolicyOp(_kornia("equalize"), 0, 0),
}
BINS = 31  # magnitude bins 0..30, as torchvision's num_bins


def policy(images: torch.Tensor, targets: torch.Tensor, g: torch.Generator, *, space: str, num_ops: int,
           magnitude: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """RandAugment (Cubuk et al. 2020: `num_ops` ops, fixed `magnitude` bin) or TrivialAugment
    (Müller & Hutter 2021: num_ops=1, magnitude=None draws a bin per image), with the op, magnitude
    and sign drawn per image. Each op runs once on the images that drew it. uint8 or [0, 1] in, [0, 1] out."""
    b, names, images = len(images), list(POLICY_OPS), as_float(images)
    for _ in range(num_ops):
        choice = torch.randint(len(names), (b,), generator=g, device=g.device).to(images.device)
        bins = (torch.full((b,), magnitude, device=g.device) if magnitude is not None
                else torch.randint(BINS, (b,), generator=g, device=g.device))
        sign = torch.where(chance(b, 0.5, g), -1.0, 1.0)
        strength = (bins / (BINS - 1)).to(images.device)
        sign = sign.to(images.device)
        out = images.clone()
        for k, name in enumerate(names):
            idx = (choice == k).nonzero().squeeze(1)  # a CPU-GPU sync point; 14 per op layer
            if len(idx) == 0 or name == "identity":
                continue
            op = POLICY_OPS[name]
            mag = strength[idx] * getattr(op, space) * (sign[idx] if op.signed else 1)
            out[idx] = op.fn(images[idx], mag).clamp(0, 1)
        images = out
    return images, targets


# --- random erasing ----------------------------------------------------------------------------

def erase(images: torch.Tensor, targets: torch.Tensor, g: torch.Generator, *, p: float,
          scale: tuple[float, float] = (0.02, 1 / 3),
          ratio: tuple[float, float] = (0.3, 3.3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random erasing / cutout (Zhong et al. 2017, torchvision's default ranges) on normalized images:
    with probability p per image, a box of `scale` of the area and aspect in `ratio` is filled with
    0, the mean colour (torchvision's value=0). The box is clipped to the image, where torchvision
    redraws up to 10 times."""
    b, _, hgt, wid = images.shape
    area = uniform(b, scale[0], scale[1], g) * hgt * wid
    aspect = torch.exp(uniform(b, math.log(ratio[0]), math.log(ratio[1]), g))
    h = torch.sqrt(area * aspect).clamp(1, hgt)
    w = torch.sqrt(area / aspect).clamp(1, wid)
    top = torch.rand(b, generator=g, device=g.device) * (hgt - h)
    left = torch.rand(b, generator=g, device=g.device) * (wid - w)
    on = chance(b, p, g)
    top, left, h, w, on = (t.to(images.device) for t in (top, left, h, w, on))
    ys = torch.arange(hgt, device=images.device) + 0.5  # pixel centres
    xs = torch.arange(wid, device=images.device) + 0.5
    rows = (ys >= top[:, None]) & (ys < (top + h)[:, None])
    cols = (xs >= left[:, None]) & (xs < (left + w)[:, None])
    inside = on[:, None, None] & rows[:, :, None] & cols[:, None, :]
    return images.masked_fill(inside[:, None], 0.0), targets


# --- mixup / cutmix ----------------------------------------------------------------------------

def beta(alpha: float, n: int, g: torch.Generator, *, tries: int = 16) -> torch.Tensor:
    """n draws of Beta(alpha, alpha) from the generator g (torch.distributions samples from the
    global RNG only). X / (X + Y) with X, Y ~ Gamma(alpha) by Marsaglia & Tsang (2000), in log
    space so small alpha does not underflow; `tries` candidates each accept with p >= 0.95, so
    all 16 failing has p < 1e-20."""
    a = alpha + 1 if alpha < 1 else alpha  # alpha < 1: Gamma(a) = Gamma(a + 1) * U^(1/a)
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    z = torch.randn(2, n, tries, generator=g, device=g.device)
    u = torch.rand(2, n, tries, generator=g, device=g.device)
    v = (1 + c * z) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp(min=1e-30)))
    first = ok.int().argmax(-1, keepdim=True)  # the first accepted candidate
    log_gamma = (math.log(d) + torch.log(v.clamp(min=1e-30))).gather(-1, first).squeeze(-1)
    if alpha < 1:
        log_gamma = log_gamma + torch.log(torch.rand(2, n, generator=g, device=g.device).clamp(min=1e-30)) / alpha
    return torch.sigmoid(log_gamma[0] - log_gamma[1])  # X / (X + Y)


def mix(images: torch.Tensor, targets: torch.Tensor, g: torch.Generator, cfg: AugConfig, *, epoch: int,
        epochs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) between image i and image B-1-i (the
    batch order is already random, as timm's), with probability mix_prob per batch or per sample
    (mix_mode). With both alphas on, each batch/sample picks one of the two at even odds. Targets
    become lam * t_i + (1 - lam) * t_partner, lam being the pixel share each image keeps; off for
    the last mix_off_epochs epochs."""
    if (cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0) or epoch >= epochs - cfg.mix_off_epochs:
        return images, targets
    b, _, hgt, wid = images.shape
    n = b if cfg.mix_mode == "sample" else 1
    on = chance(n, cfg.mix_prob, g)
    both = cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0
    cut = chance(n, 0.5, g) if both else torch.full((n,), cfg.cutmix_alpha > 0, device=g.device)
    ones = torch.ones(n, device=g.device)
    lam = torch.where(cut, beta(cfg.cutmix_alpha, n, g) if cfg.cutmix_alpha > 0 else ones,
                      beta(cfg.mixup_alpha, n, g) if cfg.mixup_alpha > 0 else ones)
    # CutMix box: sides sqrt(1 - lam) of the image's, centre uniform, clipped; lam = the share kept.
    cy, cx = torch.rand(2, n, generator=g, device=g.device)
    on, cut, lam, cy, cx = (t.to(images.device).expand(b) for t in (on, cut, lam, cy, cx))
    half = torch.sqrt(1 - lam) / 2
    top, bottom = ((cy - half) * hgt).round().clamp(0, hgt), ((cy + half) * hgt).round().clamp(0, hgt)
    left, right = ((cx - half) * wid).round().clamp(0, wid), ((cx + half) * wid).round().clamp(0, wid)
    ys, xs = torch.arange(hgt, device=images.device), torch.arange(wid, device=images.device)
    box = (((ys >= top[:, None]) & (ys < bottom[:, None]))[:, :, None]
           & ((xs >= left[:, None]) & (xs < right[:, None]))[:, None, :])
    box = box & (on & cut)[:, None, None]
    lam_cut = 1 - (bottom - top) * (right - left) / (hgt * wid)
    lam = torch.where(on, torch.where(cut, lam_cut, lam), 1.0)
    keep = torch.where(cut, 1.0, lam)[:, None, None, None]  # mixup blend weight per image
    other = images.flip(0)
    mixed = torch.where(box[:, None], other, torch.lerp(other, images, keep))
    return mixed, lam[:, None] * targets + (1 - lam[:, None]) * targets.flip(0)


# --- the pipeline ------------------------------------------------------------------------------

def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Integer labels -> soft targets; label smoothing spreads `smoothing` mass over all classes."""
    targets = F.one_hot(labels, num_classes).float()
    if smoothing:
        targets = targets * (1 - smoothing) + smoothing / num_classes
    return targets


POLICIES = {  # policy name -> keyword arguments of `policy`
    "randaugment": lambda cfg: dict(space="randaugment", num_ops=cfg.policy_ops, magnitude=cfg.policy_magnitude),
    "trivialaugment": lambda cfg: dict(space="trivialaugment", num_ops=1, magnitude=None),
}


def check(cfg: AugConfig) -> None:
    """Refuse augmentation settings outside their ranges, saying which key to fix."""
    probs = {k: getattr(cfg, k) for k in ("hflip", "grayscale", "erasing", "mix_prob")}
    problems = [f"{k}={v} is a probability: use a value in [0, 1]." for k, v in probs.items() if not 0 <= v <= 1]
    problems += [f"{k}={getattr(cfg, k)} must be >= 0." for k in ("brightness", "contrast", "saturation", "rotate",
                 "translate", "mixup_alpha", "cutmix_alpha", "mix_off_epochs") if getattr(cfg, k) < 0]
    if not 0 <= cfg.hue <= 0.5:
        problems.append(f"hue={cfg.hue} is a fraction of the colour wheel: use a value in [0, 0.5].")
    if not 0 <= cfg.policy_magnitude < BINS:
        problems.append(f"policy_magnitude={cfg.policy_magnitude} is a bin: use an integer in 0..{BINS - 1}.")
    if cfg.policy_ops < 1:
        problems.append(f"policy_ops={cfg.policy_ops}: RandAugment needs at least 1 op per image.")
    if not 0 < cfg.crop_ratio[0] <= cfg.crop_ratio[1]:
        problems.append(f"crop_ratio={cfg.crop_ratio} must be two aspect ratios lo,hi with 0 < lo <= hi.")
    if problems:
        raise UserError(" ".join(problems))


def build_train_pipeline(cfg: AugConfig, *, size: int) -> list[BatchFn]:
    """The training augmentation, as an ordered list of batch functions (see `apply`): crop/flip/
    affine, then the policy, colour jitter + normalization, erasing (mixup/cutmix act across images:
    see `mix`)."""
    check(cfg)
    steps: list[BatchFn] = [partial(geometric, size=size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                    hflip=cfg.hflip, rotate=cfg.rotate, translate=cfg.translate)]
    if cfg.policy != "none":
        steps.append(partial(policy, **POLICIES[cfg.policy](cfg)))
    steps.append(partial(colour, brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation,
                         hue=cfg.hue, grayscale=cfg.grayscale))
    if cfg.erasing > 0:
        steps.append(partial(erase, p=cfg.erasing))
    return steps


def apply(steps: list[BatchFn], images: torch.Tensor, targets: torch.Tensor,
          g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    for step in steps:
        images, targets = step(images, targets, g)
    return images, targets


def train_views(images_u8: torch.Tensor, targets: torch.Tensor, g: torch.Generator,
                steps: list[BatchFn]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache rows uint8 [B, H, W, 3] -> augmented, normalized float [B, 3, size, size]: the model's
    input (channels-last memory from the CPU path), for training, preview and TTA. The first step
    gets the rows as a uint8 view."""
    return apply(steps, images_u8.permute(0, 3, 1, 2), targets, g)


def center_crop(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """[..., H, W] square images -> their centred square of `fraction` of the side (1 = as they are)."""
    side = images.shape[-1]
    c = round(fraction * side)
    top = (side - c) // 2
    return images[..., top:top + c, top:top + c]


def eval_views(images_u8: torch.Tensor, *, size: int, crop: float = 1.0) -> torch.Tensor:
    """Cache rows -> the plain evaluation view, normalized: the model's input. `crop`: the centre
    crop's fraction of the cache's side (config eval_crop), resized to `size`."""
    return normalize(resize(center_crop(to_float(images_u8), crop), size))
