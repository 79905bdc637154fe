"""From a dataset folder to cached images and the rows each split uses."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from imgcls import cache, layouts
from imgcls.config import Config
from imgcls.errors import UserError


@dataclass
class Prepared:
    dataset: layouts.Dataset
    images: np.ndarray  # uint8 [N, S, S, 3] for all samples of all splits, memory-mapped
    labels: np.ndarray  # int64 [N], -1 for unlabeled
    ids: list[str]  # [N] sample ids (test ids are the submission ids)
    rows: dict[str, np.ndarray]  # split -> row indices into images (unreadable training rows dropped)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it was skipped
    fingerprint: str = ""
    cache_path: str = ""
    cache_built: bool = False

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes


def prepare(root, cfg: Config, *, progress: bool = True) -> Prepared:
    """Read the layout, refuse anything that would make the submission wrong, decode once."""
    ds = layouts.read(root)
    ds.check()
    samples = [s for split in ds.splits.values() for s in split]
    split_of = np.array([name for name, split in ds.splits.items() for _ in split])
    size = cfg.data.cache_size or cfg.data.image_size
    built = cache.build([s.path for s in samples], size=size, resize=cfg.data.resize, cache_dir=cfg.data.cache_dir,
                        workers=cfg.data.decode_workers, progress=progress, name=f"{ds.layout}-{ds.root.name}")
    failed = built.failed
    bad_test = [samples[i].path for i in failed if split_of[i] == "test"]
    if bad_test:
        raise UserError(f"{len(bad_test)} test image(s) cannot be read, so the submission would be incomplete: "
                        + "; ".join(f"{samples[i].path}: {failed[i]}" for i in failed if split_of[i] == "test")[:2000]
                        + ". Replace these files.")
    if failed and cfg.data.strict:
        listed = "\n  - ".join(f"{samples[i].path}: {why}" for i, why in sorted(failed.items()))
        raise UserError(f"{len(failed)} image(s) cannot be read (strict=true):\n  - {listed}\n"
                        "Fix or remove them, or set strict=false to skip them.")
    keep = np.ones(len(samples), dtype=bool)
    keep[list(failed)] = False
    rows = {name: np.flatnonzero((split_of == name) & keep) for name in ds.splits}
    labels = np.array([-1 if s.label is None else s.label for s in samples], dtype=np.int64)
    prepared = Prepared(ds, built.images, labels, [s.id for s in samples], rows,
                        skipped={str(samples[i].path): why for i, why in sorted(failed.items())},
                        fingerprint=built.path.stem.rsplit("-", 1)[-1], cache_path=str(built.path),
                        cache_built=built.built)
    if cfg.data.val_fraction > 0:
        labelled = np.concatenate([rows["train"], rows.get("val", np.empty(0, np.int64))])
        train, val = stratified_split(labels[labelled], cfg.data.val_fraction, seed=cfg.run.seed)
        prepared.rows["train"], prepared.rows["val"] = labelled[train], labelled[val]
    if len(prepared.rows.get("val", [])) == 0:
        # No validation split: hold out a stratified 10% of train so every run reports val_acc.
        train, val = stratified_split(labels[rows["train"]], 0.1, seed=cfg.run.seed)
        prepared.rows["train"], prepared.rows["val"] = rows["train"][train], rows["train"][val]
    return prepared


def stratified_split(labels: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into labels) of a seeded stratified split: `fraction` of each class held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == c))
        n = int(round(len(pos) * fraction))
        n = min(max(n, 1), len(pos) - 1) if len(pos) > 1 else 0
        held.append(pos[:n])
        train.append(pos[n:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))
