"""What the model sees: the plain evaluation view and N training views of a few images, drawn by the
training code path itself (`augment.build_train_pipeline`, `augment.train_views`, `augment.mix`,
with the augmentation generator seeded as `fit()` seeds it), saved as PNGs and one grid."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgcls import augment, hardware
from imgcls.config import Config
from imgcls.data import Prepared

SAME = 1.0  # views whose mean absolute difference is under 1 grey level (of 255) count as the same view
GAP = 4  # px of white between grid cells


@dataclass
class Preview:
    stems: list[str]  # one per image (file stem, made unique)
    views: np.ndarray  # uint8 [images, 1 + N, size, size, 3]: the eval view, then N training views
    distinct: list[int]  # per image: how many of its N training views differ from one another
    mixed: bool  # mixup/cutmix were on, so training views blend in other rows' images
    size: int = 0  # px of each view
    grid_path: Path | None = None  # grid.png, once saved


def pick_rows(prep: Prepared, n: int) -> np.ndarray:
    """n training rows: the first image of each class in turn, then the second of each, ..."""
    rows = prep.rows["train"]
    labels = prep.labels[rows]
    per_class = [rows[labels == c] for c in np.unique(labels)]
    order = [r[k] for k in range(max(len(r) for r in per_class)) for r in per_class if k < len(r)]
    return np.array(order[:n], dtype=np.int64)


def distinct_views(views: np.ndarray, *, same: float = SAME) -> int:
    """How many views differ (mean |difference| >= `same` grey levels) from every view counted before."""
    kept: list[np.ndarray] = []
    for v in views.astype(np.float32):
        if all(np.abs(v - k).mean() >= same for k in kept):
            kept.append(v)
    return len(kept)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], rounded as PNG stores it."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def render(prep: Prepared, cfg: Config, *, views: int, images: int = 8) -> Preview:
    """Eval view + `views` training views of `images` training images, on the run's device."""
    hw = hardware.resolve(cfg.run)
    size = cfg.data.image_size
    rows = pick_rows(prep, images)
    batch = torch.from_numpy(np.array(prep.images[rows])).to(hw.device)
    num_classes = prep.dataset.num_classes
    targets = augment.one_hot(torch.as_tensor(prep.labels[rows]).to(hw.device), num_classes,
                              cfg.optim.label_smoothing)
    pipeline = augment.build_train_pipeline(cfg.aug, size=size)
    g = hardware.make_generator(hw.device, cfg.run.seed + 1)  # as fit() seeds its augmentation generator
    epochs = cfg.run.epochs if cfg.run.epochs != "auto" else 10**6  # epochs=auto: not planned yet, mixing is on
    out = [to_uint8(augment.denormalize(augment.eval_views(batch, size=size, crop=cfg.data.eval_crop)))]
    with torch.no_grad():
        for _ in range(views):  # each call is what one training step does to this batch
            x, t = augment.train_views(batch, targets, g, pipeline)
            x, t = augment.mix(x, t, g, cfg.aug, epoch=0, epochs=epochs)
            out.append(to_uint8(augment.denormalize(x)))
    stacked = np.stack(out, axis=1)
    mixed = (cfg.aug.mixup_alpha > 0 or cfg.aug.cutmix_alpha > 0) and epochs > cfg.aug.mix_off_epochs
    return Preview(_stems(prep, rows), stacked, [distinct_views(v[1:]) for v in stacked], mixed, size)


def _stems(prep: Prepared, rows: np.ndarray) -> list[str]:
    samples = [s for split in prep.dataset.splits.values() for s in split]  # the cache's row order
    stems, seen = [], set()
    for r in rows:
        stem = Path(samples[r].path).stem
        stem = stem if stem not in seen else f"{stem}-{r}"
        seen.add(stem)
        stems.append(stem)
    return stems


def grid(views: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols, S, S, 3] -> one uint8 image, cells GAP px apart on white; small views are
    enlarged (nearest) to at least 128 px so the grid can be read in a report."""
    zoom = max(1, 128 // views.shape[2])
    if zoom > 1:
        views = views.repeat(zoom, axis=2).repeat(zoom, axis=3)
    rows, cols, s = views.shape[:3]
    canvas = np.full((rows * (s + GAP) - GAP, cols * (s + GAP) - GAP, 3), 255, dtype=np.uint8)
    for i in range(rows):
        for j in range(cols):
            canvas[i * (s + GAP):i * (s + GAP) + s, j * (s + GAP):j * (s + GAP) + s] = views[i, j]
    return canvas


def save(preview: Preview, out: str | Path) -> Path:
    """DIR/grid.png and DIR/views/<stem>_<k>.png (k = 0 the eval view, 1..N training views)."""
    from PIL import Image

    out = Path(out)
    (out / "views").mkdir(parents=True, exist_ok=True)
    for stem, views in zip(preview.stems, preview.views):
        for k, v in enumerate(views):
            Image.fromarray(v).save(out / "views" / f"{stem}_{k}.png")
    Image.fromarray(grid(preview.views)).save(out / "grid.png")
    preview.grid_path = out / "grid.png"
    return preview.grid_path
