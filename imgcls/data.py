"""From a dataset folder to cached images and the rows each split uses."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from imgcls import cache, config, layouts
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
    fingerprint: str = ""  # of the cache: the files (paths, sizes, times) and the decode settings
    identity: str = ""  # of the data alone: layout, classes, each file's path under the root, label and size
    cache_path: str = ""
    cache_built: bool = False
    before_subset: dict[str, int] = field(default_factory=dict)  # subset=: labelled split -> images before it

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes


def flatten(ds: layouts.Dataset) -> tuple[list[layouts.Sample], np.ndarray]:
    """All samples of all splits in one list (the cache's row order), and the split of each row."""
    samples = [s for split in ds.splits.values() for s in split]
    split_of = np.array([name for name, split in ds.splits.items() for _ in split])
    return samples, split_of


def sort_failures(samples: list[layouts.Sample], split_of: np.ndarray, failed: dict[int, str], *,
                  strict: bool) -> tuple[list[str], dict[str, str]]:
    """Unreadable files -> (errors, skipped path -> why). A test image that cannot be read would leave
    the submission without its row: always an error. A training or validation image is skipped and
    listed, unless strict=true."""
    errors, skipped = [], {}
    for i, why in sorted(failed.items()):
        if split_of[i] == "test":
            errors.append(f"test image {samples[i].path}: {why}; the submission needs it: replace the file.")
        elif strict:
            errors.append(f"{samples[i].path}: {why} (strict=true)")
        else:
            skipped[str(samples[i].path)] = why
    return errors, skipped


def identity(ds: layouts.Dataset, samples: list[layouts.Sample]) -> str:
    """What a run trained on, independent of where the folder is mounted and of file times (a Kaggle
    dataset attached again in a new session keeps it): layout, classes, and per sample its path under
    the root, its label and its size in bytes."""
    h = hashlib.sha256(f"{ds.layout}|{'|'.join(ds.classes)}".encode())
    for s in samples:
        h.update(f"|{os.path.relpath(s.path, ds.root)}|{s.label}|{os.stat(s.path).st_size}".encode())
    return h.hexdigest()[:20]


def labelled(rows: dict[str, np.ndarray]) -> np.ndarray:
    """Every labelled cache row: train and validation merged, in row order."""
    return np.sort(np.concatenate([rows["train"], rows.get("val", np.empty(0, np.int64))]))


def listing(errors: list[str], limit: int = 20) -> str:
    more = f"\n  ... and {len(errors) - limit} more" if len(errors) > limit else ""
    return "\n  - " + "\n  - ".join(errors[:limit]) + more


def prepare(root, cfg: Config, *, progress: bool = True) -> Prepared:
    """Read the layout, refuse anything that would make the submission wrong, decode once."""
    ds = layouts.read(root)
    ds.check()
    samples, split_of = flatten(ds)
    size = config.cache_size(cfg.data)
    built = cache.build([s.path for s in samples], size=size, resize=cfg.data.resize, cache_dir=cfg.data.cache_dir,
                        workers=cfg.data.decode_workers, progress=progress, name=f"{ds.layout}-{ds.root.name}")
    errors, skipped = sort_failures(samples, split_of, built.failed, strict=cfg.data.strict)
    if errors:
        refused_training = cfg.data.strict and any(split_of[i] != "test" for i in built.failed)
        hint = "\nWith strict=true: fix or remove those training images, or set strict=false to skip them." \
            if refused_training else ""
        raise UserError(f"{len(errors)} image(s) cannot be read:{listing(errors)}{hint}")
    keep = np.ones(len(samples), dtype=bool)
    keep[list(built.failed)] = False
    rows = {name: np.flatnonzero((split_of == name) & keep) for name in ds.splits}
    labels = np.array([-1 if s.label is None else s.label for s in samples], dtype=np.int64)
    before = {name: len(r) for name, r in rows.items() if name != "test"}
    split_seed = cfg.data.split_seed if cfg.data.split_seed >= 0 else cfg.run.seed
    rows = subset_rows(rows, labels, cfg.data.subset, seed=split_seed)  # before any re-split: both get a share
    prepared = Prepared(ds, built.images, labels, [s.id for s in samples], rows, skipped=skipped,
                        fingerprint=built.path.stem.rsplit("-", 1)[-1], identity=identity(ds, samples),
                        cache_path=str(built.path),
                        cache_built=built.built, before_subset=before if cfg.data.subset else {})
    if cfg.data.holdout == "none":  # a final fit on every labelled image: nothing is held out
        prepared.rows["train"], prepared.rows["val"] = labelled(rows), np.empty(0, np.int64)
        return prepared
    if cfg.data.val_fraction > 0:
        merged = labelled(rows)
        train, val = stratified_split(labels[merged], cfg.data.val_fraction, seed=split_seed)
        prepared.rows["train"], prepared.rows["val"] = merged[train], merged[val]
    if len(prepared.rows.get("val", [])) == 0:
        # No validation split: hold out a stratified 10% of train so every run reports val_acc.
        train, val = stratified_split(labels[rows["train"]], 0.1, seed=split_seed)
        prepared.rows["train"], prepared.rows["val"] = rows["train"][train], rows["train"][val]
    if cfg.data.subset and (len(prepared.rows["val"]) == 0 or len(prepared.rows["train"]) == 0):
        raise UserError(f"subset={cfg.data.subset:g} leaves {len(prepared.rows['train'])} training and "
                        f"{len(prepared.rows['val'])} validation images: keep at least 2 images of each class "
                        "(e.g. subset=0.1 or subset=10).")
    return prepared


def subset_rows(rows: dict[str, np.ndarray], labels: np.ndarray, subset: float, *, seed: int) -> dict[str, np.ndarray]:
    """subset=: of every labelled split, a seeded share of each class (subset in (0, 1); at least one image
    of a class that has any) or `subset` images of each class (subset >= 1; all of a smaller class).
    The test split is kept whole, so the submission still has every row. subset=0: `rows` as they are."""
    if not subset:
        return rows
    rng = np.random.default_rng([seed, 18])  # a stream apart from stratified_split's, which draws from seed alone
    out = {}
    for name, split in rows.items():
        if name == "test":
            out[name] = split
            continue
        kept = []
        for c in np.unique(labels[split]):
            of_class = rng.permutation(split[labels[split] == c])
            n = int(subset) if subset >= 1 else max(1, int(round(len(of_class) * subset)))
            kept.append(of_class[:n])
        out[name] = np.sort(np.concatenate(kept)) if kept else split
    return out


def subset_line(prep: Prepared, cfg: Config) -> str:
    """What subset= kept, e.g. "subset=0.1: 5000 of 50000 labelled images (train 4500, val 500), test whole (5000)"."""
    labelled = {k: len(v) for k, v in prep.rows.items() if k != "test"}
    splits = ", ".join(f"{k} {n}" for k, n in labelled.items())
    test = len(prep.rows.get("test", []))
    return (f"subset={cfg.data.subset:g}: {sum(labelled.values())} of {sum(prep.before_subset.values())} labelled "
            f"images ({splits}){f', test whole ({test})' if test else ''}")


def per_class(rows: np.ndarray, labels: np.ndarray, num_classes: int) -> list[int]:
    """Images of each class among `rows`, in class order."""
    return np.bincount(labels[rows], minlength=num_classes).tolist()


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
