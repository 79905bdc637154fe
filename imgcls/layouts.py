"""Read a competition folder into samples: (path, label or None, id) per split, plus class names.

Three layouts are detected (INTERFACE.md): food-11, tiny-imagenet and imagefolder. Anything that
would make the submission wrong is collected as an error here, before any training starts.
"""
from __future__ import annotations

import csv
import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imgcls.cache import UNSUPPORTED_FORMATS
from imgcls.errors import UserError, command_line

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".avif", ".jp2",
              ".tga"}
# Image formats Pillow cannot read are still listed as samples, so the cache reports each one
# ("HEIC images are not supported; convert it") instead of the file silently going missing.
LISTED_EXTS = IMAGE_EXTS | set(UNSUPPORTED_FORMATS)
FOOD_NAME = re.compile(r"^(\d+)_(\d+)$")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int | None  # None for unlabeled (test) images
    id: str  # the id written in submissions (test) or a unique name (train/val)


@dataclass
class Dataset:
    layout: str  # food-11 | tiny-imagenet | imagefolder
    root: Path
    classes: list[str]
    splits: dict[str, list[Sample]]  # train, val (optional), test (optional)
    id_header: tuple[str, str] = ("id", "label")  # submission column names
    template: list[str] | None = None  # submission row ids in template order (tiny-imagenet)
    errors: list[str] = field(default_factory=list)  # would make the submission wrong
    warnings: list[str] = field(default_factory=list)  # skipped files and the like

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> dict[str, int]:
        return {name: len(samples) for name, samples in self.splits.items()}

    def describe(self) -> str:
        """One line: where, which layout, how many classes and images per split."""
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        return f"{self.root}: {self.layout} layout, {self.num_classes} classes, {counts}"

    def check(self) -> None:
        """Raise one UserError listing every problem that would make the submission wrong."""
        if self.errors:
            listed = "\n  - ".join(self.errors)
            raise UserError(f"{self.root} has {len(self.errors)} problem(s) to fix before training:\n  - {listed}\n"
                            f"(`{command_line('inspect', self.root)}` also lists unreadable images, in the same pass.)")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in LISTED_EXTS)


def _non_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in LISTED_EXTS
                  and not p.name.startswith("."))


def _test_split(folder: Path, *, id_of, ds: Dataset) -> list[Sample]:
    samples = [Sample(p, None, id_of(p)) for p in _images(folder)]
    dupes = [i for i, n in Counter(s.id for s in samples).items() if n > 1]
    if dupes:
        ds.errors.append(f"{folder}: {len(dupes)} test id(s) occur more than once "
                         f"(e.g. {', '.join(sorted(dupes)[:5])}); each test id must be unique.")
    return samples


def _read_food11(root: Path) -> Dataset:
    ds = Dataset("food-11", root, [], {}, id_header=("Id", "Category"))
    for split, folder in (("train", "training"), ("val", "validation")):
        if not (root / folder).is_dir():
            continue
        samples = []
        for p in _images(root / folder):
            m = FOOD_NAME.match(p.stem)
            if not m:
                ds.errors.append(f"{p}: food-11 file names are <label>_<n>.<ext> with a numeric label; "
                                 "rename or remove this file.")
                continue
            samples.append(Sample(p, int(m.group(1)), f"{folder}/{p.name}"))
        ds.splits[split] = samples
    labels = {s.label for split in ds.splits.values() for s in split}
    names_file = root / "classes.txt"
    if names_file.is_file():
        ds.classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    else:
        ds.classes = [str(i) for i in range(max(labels) + 1)] if labels else []
    out_of_range = sorted(i for i in labels if i >= len(ds.classes))
    if out_of_range:
        ds.errors.append(f"labels {out_of_range} are beyond the {len(ds.classes)} classes in {names_file}.")
    if (root / "test").is_dir():
        ds.splits["test"] = _test_split(root / "test", id_of=lambda p: p.stem, ds=ds)
    return ds


def _read_tiny_imagenet(root: Path) -> Dataset:
    ds = Dataset("tiny-imagenet", root, [], {}, id_header=("image_id", "label"))
    wnids = [line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip()]
    ds.classes = wnids  # label = 0-based line index in file order, NOT sorted
    dupes = [w for w, n in Counter(wnids).items() if n > 1]
    if dupes:
        ds.errors.append(f"wnids.txt names {', '.join(dupes)} more than once.")
    train = root / "train"
    present = {p.name for p in train.iterdir() if p.is_dir()} if train.is_dir() else set()
    for w in sorted(set(wnids) - present):
        ds.errors.append(f"wnids.txt names {w} but {train / w} is missing: add the folder or remove the line.")
    for w in sorted(present - set(wnids)):
        ds.errors.append(f"{train / w} is not named in wnids.txt: add it to wnids.txt or remove the folder.")
    samples = []
    for label, w in enumerate(wnids):
        folder = train / w / "images"
        if not folder.is_dir():
            folder = train / w  # tolerate images directly in the class folder
        if not folder.is_dir():
            continue
        found = _images(folder)
        if not found:
            ds.errors.append(f"{folder} holds no images; class {w} would never be learned.")
        samples += [Sample(p, label, f"{w}/{p.name}") for p in found]
    ds.splits["train"] = samples
    for name in ("val", "validation"):
        if (root / name).is_dir():
            ds.warnings.append(f"{root / name} is ignored: tiny-imagenet validation comes from val_fraction=.")
    test_dir = root / "test" / "images"
    if not test_dir.is_dir():
        test_dir = root / "test"
    if test_dir.is_dir():
        ds.splits["test"] = _test_split(test_dir, id_of=lambda p: p.name, ds=ds)
    template = root / "submission_sample.csv"
    if template.is_file() and "test" in ds.splits:
        ds.template = _read_template(template, ds)
    return ds


def _read_template(path: Path, ds: Dataset) -> list[str]:
    """The template's ids in its row order; its own two column names become the submission's header.
    utf-8-sig: Excel and many Kaggle downloads start the file with a byte-order mark."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [c.strip() for c in rows[0]] if rows else []
    if len(header) != 2 or not all(header):
        ds.errors.append(f"{path}: the header must name two columns, an id and a label (like "
                         f"{','.join(ds.id_header)}), got {','.join(header) if rows else 'nothing'}.")
        return []
    ds.id_header = (header[0], header[1])
    ids = [r[0].strip() for r in rows[1:] if r]
    test_ids = {s.id for s in ds.splits["test"]}
    missing = [i for i in ids if i not in test_ids]
    extra = sorted(test_ids - set(ids))
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if missing:
        ds.errors.append(f"{path}: {len(missing)} template id(s) have no test image (e.g. {', '.join(missing[:3])}).")
    if extra:
        ds.errors.append(f"{path}: {len(extra)} test image(s) are not in the template (e.g. {', '.join(extra[:3])}).")
    if dupes:
        ds.errors.append(f"{path}: {len(dupes)} id(s) occur more than once (e.g. {', '.join(dupes[:3])}).")
    return ids


def _read_imagefolder(root: Path) -> Dataset:
    ds = Dataset("imagefolder", root, [], {}, id_header=("id", "label"))
    ds.classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    for split, folder in (("train", "train"), ("val", "val")):
        if not (root / folder).is_dir():
            continue
        samples = []
        for label, name in enumerate(ds.classes):
            class_dir = root / folder / name
            if not class_dir.is_dir():
                continue
            found = _images(class_dir)
            if not found and split == "train":
                ds.errors.append(f"{class_dir} holds no images; remove the empty class folder.")
            samples += [Sample(p, label, f"{folder}/{name}/{p.name}") for p in found]
        ds.splits[split] = samples
    if (root / "test").is_dir():
        ds.splits["test"] = _test_split(root / "test", id_of=lambda p: p.name, ds=ds)
    return ds


def detect(root: Path) -> str:
    if (root / "wnids.txt").is_file():
        return "tiny-imagenet"
    if (root / "training").is_dir():
        return "food-11"
    if (root / "train").is_dir():
        return "imagefolder"
    raise UserError(
        f"{root} is not a dataset folder imgcls knows. Expected one of: food-11 (training/<label>_<n>.jpg), "
        "tiny-imagenet (wnids.txt + train/<wnid>/images/), imagefolder (train/<class>/*).")


def _short_side(path: Path) -> int | None:
    from PIL import Image

    try:
        with Image.open(path) as im:  # the header only
            return min(im.size)
    except Exception:  # an unreadable file is reported by the cache, with its name, not here
        return None


def median_short_side(train: Path, most: int = 64) -> int | None:
    """The median short side in px of about `most` images of an imagefolder's train/, as many from each class
    folder as that takes (at most `most` class folders listed); None when none of them opens."""
    folders = sorted(p for p in train.iterdir() if p.is_dir())
    each = -(-most // max(1, len(folders)))
    files = (p for folder in folders[:most] for p in itertools.islice(
        (f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS), each))
    sides = sorted(side for side in map(_short_side, files) if side)
    return sides[len(sides) // 2] if sides else None


READERS = {"food-11": _read_food11, "tiny-imagenet": _read_tiny_imagenet, "imagefolder": _read_imagefolder}


def read(root: str | Path) -> Dataset:
    """Detect the layout and list every sample; problems are collected in .errors, not raised."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"Dataset folder {root} does not exist (or is not a folder).")
    ds = READERS[detect(root)](root)
    if not ds.splits.get("train"):
        ds.errors.append(f"{root}: no training images found for the {ds.layout} layout.")
    for split, samples in ds.splits.items():
        folder = {"food-11": {"train": "training", "val": "validation"}}.get(ds.layout, {}).get(split, split)
        others = [p for p in _non_images(root / folder)] if (root / folder).is_dir() else []
        if others:
            ds.warnings.append(f"{len(others)} non-image file(s) in {root / folder} ignored (e.g. {others[0].name}).")
    return ds
