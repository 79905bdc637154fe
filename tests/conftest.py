"""Shared fixtures: small slices of the real datasets in ../shared/data, and generated folders."""
from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("IMGCLS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test decodes into its own cache folder: nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path_factory.mktemp("cache")))


def _extract(tarball: Path, dest: Path, keep) -> Path:
    if not tarball.is_file():
        pytest.skip(f"{tarball} is absent: the real-image tests need ../shared/data beside the checkout")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar if m.isfile() and keep(m.name)]
        tar.extractall(dest, members=members, filter="data")
    return dest


@pytest.fixture(scope="session")
def food10_slice(tmp_path_factory) -> Path:
    """food-10 with 12 training, 4 validation images per class and 30 test images (real photos)."""
    def keep(name: str) -> bool:
        m = re.match(r"food-10/(training|validation)/(\d+)_(\d+)\.jpg$", name)
        if m:
            return int(m.group(3)) < (12 if m.group(1) == "training" else 4) or name.endswith("training/8_103.jpg")
        m = re.match(r"food-10/test/(\d+)\.jpg$", name)
        return bool(m and int(m.group(1)) <= 30) or name == "food-10/classes.txt"
    return _extract(SHARED_DATA / "food-10.tar.gz", tmp_path_factory.mktemp("food"), keep) / "food-10"


@pytest.fixture(scope="session")
def tiny_slice(tmp_path_factory) -> Path:
    """tiny-imagenet-100 with 6 training images per class, 40 test images and a matching template."""
    def keep(name: str) -> bool:
        m = re.match(r"tiny-imagenet-100/train/\w+/images/\w+_(\d+)\.JPEG$", name)
        if m:
            return int(m.group(1)) < 6
        m = re.match(r"tiny-imagenet-100/test/images/test_(\d+)\.JPEG$", name)
        if m:
            return int(m.group(1)) < 40
        return name.endswith(("wnids.txt", "words.txt", "_boxes.txt"))
    root = _extract(SHARED_DATA / "tiny-imagenet-100.tar.gz", tmp_path_factory.mktemp("tiny"), keep) / "tiny-imagenet-100"
    (root / "submission_sample.csv").write_text("image_id,label\n" + "".join(f"test_{k}.JPEG,0\n" for k in range(40)))
    return root


def write_image(path: Path, *, size=(24, 20), mode="RGB", seed=0, fmt=None) -> Path:
    """A random image file of the given Pillow mode."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1, "RGBA": 4, "LA": 2}.get(mode, 3)
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, {3: "RGB", 1: "L", 4: "RGBA", 2: "LA"}[channels])
    img.save(path, format=fmt)
    return path


def colour_food11(root: Path, *, train: int = 8, val: int = 3, test: int = 5, side: int = 20, spread: float = 30,
                  bright: int = 200, dark: int = 40, ext: str = "jpg", seed: int = 0) -> Path:
    """A generated food-11 folder: 3 classes, `train` + `val` images each and `test` test images, noise of
    `spread` around one mean colour per class, so even a tiny model learns it in a few steps."""
    rng = np.random.default_rng(seed)
    colours = [(bright, dark, dark), (dark, bright, dark), (dark, dark, bright)]

    def save(path: Path, colour) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(rng.normal(colour, spread, (side, side, 3)), 0, 255).astype(np.uint8)).save(path)

    for folder, n in (("training", train), ("validation", val)):
        for label, colour in enumerate(colours):
            for i in range(n):
                save(root / folder / f"{label}_{i}.{ext}", colour)
    for i in range(test):
        save(root / "test" / f"{i + 1:04d}.{ext}", colours[i % 3])
    return root


@pytest.fixture
def food11_tiny(tmp_path) -> Path:
    """3 classes, 8 training + 3 validation images each (20 px JPEGs), 5 test images."""
    return colour_food11(tmp_path / "food11")


# Small, fast training settings for tests: a few-thousand-parameter model at 16-32 px on the CPU.
FAST = ["model=tinycnn", "width=8", "image_size=16", "epochs=2", "batch_size=8", "device=cpu",
        "progress=false", "decode_workers=1"]
