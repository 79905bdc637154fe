"""Batch augmentations on the training device.

Every augmentation is a plain function `(images, targets, generator) -> (images, targets)` over a
whole batch: images float [B, 3, H, W] in [0, 1] (before `normalize`), targets soft [B, C]. The
first step, `geometric`, also takes the uint8 cache rows as a [B, 3, H, W] view and returns float.
Each sample draws its own parameters from the generator passed in, so a run is reproducible
and two images in one batch get different parameters.

Why not a library's augmentation modules: kornia.augmentation draws every parameter from torch's
global RNG (no per-call generator: `generator=` raises, see kornia/augmentation/_2d/base.py, kornia
issue #4427), and its RandAugment/TrivialAugment pick the ops once per batch;
torchvision.transforms.v2 draws one parameter set per call, so a whole batch gets the same crop and
jitter. We draw the parameters here from the passed generator and use the libraries' functional
ops where they take per-sample parameters (kornia.enhance, torchvision's autocontrast, torch's
grid_sample and uint8 resize). Timings quoted below: B=128 images at 128 px on the 2-core CPU, from
`python benchmarks/pipeline.py --components`.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable

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
    scale = torch.tensor([1 / s for s in STD], device=images.device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=images.device).view(1, 3, 1, 1)
    return torch.mul(images, scale).add_(shift)  # (images - mean) / std; 1.0 ms per batch, addcmul 2.6 ms


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# --- geometric ---------------------------------------------------------------------------------

def geometric(images: torch.Tensor, targets: torch.Tensor, g: torch.Generator, *, size: int,
              scale: tuple[float, float], ratio: tuple[float, float], hflip: float, rotate: float,
              translate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop, horizontal flip, rotation and translation, per sample; uint8 or float in,
    float [B, 3, size, size] out.

    On the GPU, and whenever rotate or translate is on, one per-sample affine warp (grid_sample)
    does all four, so the cost does not grow with the number of geometric ops; out-of-image pixels
    are filled by reflection. On the CPU, crop and flip alone take the uint8 cache rows through
    torch's AVX2 uint8 antialiased resize, one integer crop box per image as torchvision's
    RandomResizedCrop: 12.7 ms per batch, against 28.4 ms for the grid_sample path and 36.7 ms for
    kornia's RandomResizedCrop + RandomHorizontalFlip (2026-11-23, with other jobs on the CPU). Both paths
    draw the same parameters.
    """
    b = images.shape[0]
    w, h = crop_sides(b, scale, ratio, g)
    cx = (uniform(b, -1, 1, g) * (1 - w))  # crop centre in [-1, 1] coordinates, inside the image
    cy = (uniform(b, -1, 1, g) * (1 - h))
    if translate > 0:
        cx = cx + uniform(b, -2 * translate, 2 * translate, g)
        cy = cy + uniform(b, -2 * translate, 2 * translate, g)
    flip = torch.where(torch.rand(b, generator=g, device=g.device) < hflip, -1.0, 1.0)
    if images.dtype == torch.uint8 and images.device.type == "cpu" and rotate == 0 and translate == 0:
        return as_float(_crop_resize_u8(images, size=size, w=w, h=h, cx=cx, cy=cy, flip=flip < 0)), targets
    angle = uniform(b, -rotate, rotate, g) * (math.pi / 180) if rotate > 0 else torch.zeros(b, device=g.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([w * flip * cos, -h * sin, cx], dim=1),
        torch.stack([w * flip * sin, h * cos, cy], dim=1),
    ], dim=1)
    return warp(as_float(images), theta, size=size, fill="reflection"), targets


def crop_sides(b: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator, *,
               tries: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-resized-crop width and height as fractions of the (square) image side, drawn as
    torchvision's RandomResizedCrop.get_params: up to `tries` (area, log-aspect) candidates per image,
    the first whose sides both fit, else the whole image. Clamping a candidate that does not fit
    instead of drawing again favours large crops: mean area 0.667 against torchvision's 0.620 at
    scale (0.35, 1), a weaker augmentation than the one timm and torchvision users know (issue 7)."""
    area = uniform(b * tries, scale[0], scale[1], g).view(b, tries)
    aspect = torch.exp(uniform(b * tries, math.log(ratio[0]), math.log(ratio[1]), g)).view(b, tries)
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= 1) & (h <= 1)
    first = fits.int().argmax(1, keepdim=True)  # the first candidate that fits (0 when none does)
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), 1.0)
    h = torch.where(found, h.gather(1, first).squeeze(1), 1.0)
    return w, h


def _crop_resize_u8(images: torch.Tensor, *, size: int, w, h, cx, cy, flip) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> uint8 [B, 3, size, size]: per-image integer crop box, bilinear
    antialiased resize (the uint8 kernel is fastest on channels-last input: the cache view is).

    One resize per image is too small to split over cores, so the batch is split over one Python
    thread per torch CPU thread (the kernels release the GIL) and each of them runs its ops on ONE
    OpenMP thread: left at torch's count, every 128 px resize and flip opens a parallel region of
    its own and 2 threads x 2 threads fight over 2 cores. Resize + flip of 128 crops to 128 px, in
    one process on the shared 2-core CPU: 13.1 ms that way, 4.3-5.4 ms this way, 6.7-7.6 ms as a plain
    loop on the main thread; with another job busy on one core, this way and the plain loop both
    take about 8 ms."""
    side = images.shape[-1]
    boxes = []
    for wi, hi, x, y in zip(w.tolist(), h.tolist(), cx.tolist(), cy.tolist()):
        cw, ch = min(side, max(1, round(wi * side))), min(side, max(1, round(hi * side)))
        left = min(side - cw, max(0, round((x + 1) / 2 * side - cw / 2)))
        top = min(side - ch, max(0, round((y + 1) / 2 * side - ch / 2)))
        boxes.append((top, left, ch, cw))
    flips = flip.tolist()

    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=images.device)

    def crop(i: int) -> None:
        top, left, ch, cw = boxes[i]
        resized = F.interpolate(images[i:i + 1, :, top:top + ch, left:left + cw], size=(size, size),
                                mode="bilinear", antialias=True, align_corners=False)[0]
        out[i].copy_(resized.flip(-1) if flips[i] else resized)  # to NCHW while it is in cache: as_float is then 1 pass

    def crops(part: range) -> None:
        torch.set_num_threads(1)  # this Python thread's own OpenMP setting
        for i in part:
            crop(i)

    cores = torch.get_num_threads()
    threads = max(1, min(cores, len(images) // 16))
    if threads == 1:
        for i in range(len(images)):
            crop(i)
        return out
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(crops, [range(k, len(images), threads) for k in range(threads)]))
    finally:
        torch.set_num_threads(cores)  # torch also keeps the last count for threads it starts later: put it back
    return out


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
    """Colour jitter (torchvision ColorJitter's factors, in a random order per image) then greyscale
    with probability `grayscale`, as ONE affine colour map per image and one pass over the pixels.

    Brightness, contrast, saturation, a YIQ hue rotation and greyscale are all affine in RGB, and
    contrast's mean grey follows from the channel means, so the whole chain composes exactly into
    a 3x3 matrix and an offset per image. The one difference from torchvision: values are clamped
    to [0, 1] once at the end, not after each factor. 4.8 ms per batch; kornia's ColorJitter (global
    RNG) takes 116.8 ms (24x) and torchvision's per-sample functional ops would need a loop over images.
    """
    b, device = len(images), images.device
    ones = torch.ones(b, device=g.device)

    def factor(strength: float) -> torch.Tensor:
        return uniform(b, max(0.0, 1 - strength), 1 + strength, g) if strength > 0 else ones

    bri, con, sat = factor(brightness), factor(contrast), factor(saturation)
    turns = uniform(b, -hue, hue, g) if hue > 0 else torch.zeros(b, device=g.device)
    order = torch.rand(b, 4, generator=g, device=g.device).argsort(1)  # per-image order of the 4 factors
    grey = chance(b, grayscale, g) if grayscale > 0 else torch.zeros(b, dtype=torch.bool, device=g.device)
    bri, con, sat, turns, order, grey = (t.to(device) for t in (bri, con, sat, turns, order, grey))

    w = torch.tensor(GREY, device=device)
    eye = torch.eye(3, device=device).expand(b, 3, 3)
    to_grey = w.expand(3, 3)  # every output channel = luma
    sat_m = sat[:, None, None] * eye + (1 - sat)[:, None, None] * to_grey
    hue_m = _yiq_hue_rotations(turns)
    channel_means = images.mean((2, 3)) if contrast > 0 else torch.zeros(b, 3, device=device)
    m, v = eye.clone(), torch.zeros(b, 3, device=device)  # the colour map so far: x -> m x + v
    for k in range(4):
        op = order[:, k, None, None]
        mean_grey = ((m @ channel_means[:, :, None]).squeeze(2) + v) @ w  # mean luma after the map so far
        candidates_m = [bri[:, None, None] * m, con[:, None, None] * m, sat_m @ m, hue_m @ m]
        candidates_v = [bri[:, None] * v, con[:, None] * v + ((1 - con) * mean_grey)[:, None],
                        (sat_m @ v[:, :, None]).squeeze(2), (hue_m @ v[:, :, None]).squeeze(2)]
        m = sum(torch.where(op == j, cm, 0) for j, cm in enumerate(candidates_m))
        v = sum(torch.where(op[:, :, 0] == j, cv, 0) for j, cv in enumerate(candidates_v))
    m = torch.where(grey[:, None, None], to_grey @ m, m)
    v = torch.where(grey[:, None], v @ to_grey.T, v)
    return _colour_map(images, m, v), targets


def _colour_map(images: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
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
    and sign drawn per image. Each op runs once on the images that drew it."""
    b, names = len(images), list(POLICY_OPS)
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
    """Random erasing / cutout (Zhong et al. 2017, torchvision's default ranges): with probability
    p per image, a box of `scale` of the area and aspect in `ratio` is filled with the mean colour
    (0 after `normalize`, torchvision's value=0). The box is clipped to the image, where torchvision
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
    fill = torch.tensor(MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return torch.where(inside[:, None], fill, images), targets


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
    affine, then the policy, colour, erasing (mixup/cutmix act across images: see `mix`)."""
    check(cfg)
    steps: list[BatchFn] = [partial(geometric, size=size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                    hflip=cfg.hflip, rotate=cfg.rotate, translate=cfg.translate)]
    if cfg.policy != "none":
        steps.append(partial(policy, **POLICIES[cfg.policy](cfg)))
    jitter = dict(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue,
                  grayscale=cfg.grayscale)
    if any(jitter.values()):
        steps.append(partial(colour, **jitter))
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
    """Cache rows uint8 [B, H, W, 3] -> augmented float [B, 3, size, size] in [0, 1] (not
    normalized), for training, preview and TTA. The first step gets the rows as a uint8 view."""
    images, targets = apply(steps, images_u8.permute(0, 3, 1, 2), targets, g)
    return as_float(images), targets


def eval_views(images_u8: torch.Tensor, *, size: int) -> torch.Tensor:
    """Cache rows -> the plain evaluation view in [0, 1] (not normalized)."""
    return resize(to_float(images_u8), size)
