"""infer() returns logits; evaluation, test-time augmentation and loading a trained run build on it.
Ensembles of runs and probabilities on disk: imgcls/ensemble.py."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from imgcls import augment, checkpoint, config, finetune
from imgcls.errors import UserError
from imgcls.hardware import Hardware
from imgcls.models import create_model


def _batches(images, rows: np.ndarray, batch_size: int, device: torch.device):
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if isinstance(images, torch.Tensor):
            yield images.index_select(0, torch.as_tensor(chunk, device=images.device)).to(device, non_blocking=True)
        else:
            yield torch.from_numpy(np.ascontiguousarray(images[chunk])).to(device)


@torch.no_grad()
def infer(model: nn.Module, images, rows: np.ndarray, *, size: int, hw: Hardware, batch_size: int = 512,
          crop: float = 1.0, view=None) -> torch.Tensor:
    """Logits (float32, on the CPU) for cache rows, in the order of `rows`.

    view(images_u8) -> the model's input (normalized); default: the plain evaluation view (the centre
    `crop` of the side, resized to `size`)."""
    model.eval()
    view = view or partial(augment.eval_views, size=size, crop=crop)
    out = []
    for batch in _batches(images, rows, batch_size, hw.device):
        x = view(batch).contiguous(memory_format=hw.memory_format)
        with hw.autocast():
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, images, rows: np.ndarray, labels: np.ndarray, *, size: int, hw: Hardware,
             batch_size: int = 512, crop: float = 1.0) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, logits) on labelled rows, on the plain view (see infer)."""
    logits = infer(model, images, rows, size=size, hw=hw, batch_size=batch_size, crop=crop)
    y = torch.as_tensor(labels[rows])
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item(), logits


@dataclass
class LoadedRun:
    path: Path
    cfg: config.Config
    classes: list[str]
    model: nn.Module


def load_run(run_dir: str | Path, *, weights: str = "best", hw: Hardware) -> LoadedRun:
    """A trained run directory -> its config and model with `best` (or `last`) weights on hw.device."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir} is not an imgcls run directory (no config.yaml / manifest.json).")
    cfg = config.resolve(file=run_dir / "config.yaml")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    classes = manifest["classes"]
    model = create_model(cfg.model.model, len(classes), width=cfg.model.width, dropout=cfg.model.dropout)
    checkpoint.load_weights(model, run_dir / f"{weights}.safetensors")
    finetune.renormalize(model, manifest.get("mean_std"))  # the input normalization the run trained with
    model.to(hw.device, memory_format=hw.memory_format).eval()
    return LoadedRun(run_dir, cfg, classes, model)


# --- test-time augmentation --------------------------------------------------------------------
# final probs = weight * p(plain eval view) + (1 - weight) * mean of p over n views.
# Two view sets: "fixed" (the default) is flips and shifted crops, the same on every run and
# device; "aug" draws views with the run's own training augmentation from a seeded generator.

TTA_WEIGHT = 0.5  # weight of the plain view; 1 = plain prediction
CROP = 0.875  # shifted crops keep 87.5% of the side: corner crops sit 6.25% of the side off centre,
#              like airbench's 2 px translation at 32 px
FIXED_VIEWS = [("plain", True), ("top_left", False), ("bottom_right", True), ("top_right", False),
               ("bottom_left", True), ("center", False), ("top_left", True), ("bottom_right", False),
               ("top_right", True), ("bottom_left", False), ("center", True)]  # (crop, hflip), plain view excluded


def fixed_view(images_u8: torch.Tensor, *, size: int, crop: str, flip: bool, plain_crop: float = 1.0) -> torch.Tensor:
    """Cache rows -> one deterministic view, normalized: a CROP-sized corner/centre crop (or, for
    "plain", the plain view's centre crop of `plain_crop`), optionally flipped, resized to `size`."""
    import torchvision.transforms.v2.functional as TF

    x = augment.to_float(images_u8)
    side = x.shape[-1]
    c = round(CROP * side)
    offsets = {"top_left": (0, 0), "top_right": (0, side - c), "bottom_left": (side - c, 0),
               "bottom_right": (side - c, side - c), "center": ((side - c) // 2, (side - c) // 2)}
    if crop == "plain":
        x = augment.center_crop(x, plain_crop)
    else:
        top, left = offsets[crop]
        x = TF.crop(x, top, left, c, c)
    if flip:
        x = TF.horizontal_flip(x)
    return augment.normalize(augment.resize(x, size))


def fixed_views(n: int, *, size: int, crop: float, aug, seed: int, device: torch.device) -> list:
    check_tta(n, TTA_WEIGHT, "fixed")
    return [partial(fixed_view, size=size, crop=name, flip=flip, plain_crop=crop) for name, flip in FIXED_VIEWS[:n]]


def aug_views(n: int, *, size: int, crop: float, aug, seed: int, device: torch.device) -> list:
    """n views from the run's training augmentation (batch mixing off: it would blend test images).
    One generator, seeded, serves all views in turn: the same seed and batch size give the same views."""
    from imgcls import hardware

    pipeline = augment.build_train_pipeline(replace(aug, mixup_alpha=0.0, cutmix_alpha=0.0), size=size)
    g = hardware.make_generator(device, seed)

    def view(images_u8: torch.Tensor) -> torch.Tensor:
        no_targets = torch.zeros(len(images_u8), 1, device=images_u8.device)
        return augment.train_views(images_u8, no_targets, g, pipeline)[0]
    return [view] * n


TTA_VIEWS = {"fixed": fixed_views, "aug": aug_views}


def check_tta(n: int, weight: float, views: str) -> None:
    """Refuse TTA settings that cannot work, before any image is read (predict and check call it first)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"--tta is the number of test-time views besides the plain one: 0 or more, got {n}.")
    if not 0 <= weight <= 1:
        raise UserError(f"--tta-weight is the plain view's weight in [0, 1], got {weight}.")
    if views not in TTA_VIEWS:
        raise UserError(f"--tta-views {views} is not one of {', '.join(TTA_VIEWS)}.")
    if views == "fixed" and n > len(FIXED_VIEWS):
        raise UserError(f"--tta {n} asks for more than the {len(FIXED_VIEWS)} fixed views (flip, and 5 crops each "
                        f"plain and flipped); use --tta {len(FIXED_VIEWS)} or fewer, or --tta-views aug.")


def tta_probs(model: nn.Module, images, rows: np.ndarray, *, size: int, hw: Hardware, n: int = 0,
              weight: float = TTA_WEIGHT, views: str = "fixed", aug=None, seed: int = 0,
              batch_size: int = 512, crop: float = 1.0) -> torch.Tensor:
    """Probabilities [len(rows), C]: weight * p(plain view) + (1 - weight) * mean over n views; n=0 is plain."""
    check_tta(n, weight, views)
    probs = infer(model, images, rows, size=size, hw=hw, batch_size=batch_size, crop=crop).softmax(1)
    if n <= 0:
        return probs
    view_fns = TTA_VIEWS[views](n, size=size, crop=crop, aug=aug, seed=seed, device=hw.device)
    mean = sum(infer(model, images, rows, size=size, hw=hw, batch_size=batch_size, view=v).softmax(1)
               for v in view_fns) / n
    return weight * probs + (1 - weight) * mean
