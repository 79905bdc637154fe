"""`imgcls demo`: a real image dataset that ships inside scikit-learn (the 1,797 8x8 handwritten
digits of the UCI ML repository), laid out as a food-11 competition folder, then trained."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imgcls import config, rundir

# Tuned for 8x8 digits upscaled to 32 px (a tiny CNN, SGD): the photo recipe's LAMB and flat_cos
# (recipes.py) reached 0.46 instead of 0.5+ here in 12 epochs, so the demo keeps its own optimizer.
DEMO_SETTINGS = {"model": "tinycnn", "width": 16, "image_size": 32, "epochs": 12, "batch_size": 64,
                 "optimizer": "sgd", "lr": 0.4, "schedule": "cosine", "ema": 0.0,
                 "crop_scale": (0.7, 1.0), "hflip": 0.0, "decode_workers": 1}


def write_digits(root: Path, *, seed: int = 0) -> Path:
    """training/ 60%, validation/ 20%, test/ 20% as 32x32 JPEGs; test ids 0001.. like food-11."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
    splits = {"training": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for folder, idx in splits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        counts: dict[int, int] = {}
        for k, i in enumerate(idx):
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
            img = Image.fromarray(pixels, "L").resize((32, 32), Image.BILINEAR).convert("RGB")
            label = int(digits.target[i])
            n = counts[label] = counts.get(label, -1) + 1
            name = f"{k + 1:04d}.jpg" if folder == "test" else f"{label}_{n}.jpg"
            img.save(root / folder / name, quality=95)
    (root / "classes.txt").write_text("".join(f"{d}\n" for d in range(10)))
    return root


def train_demo(out: Path, *, overrides: dict | list[str] = (), log=lambda text: None, on_epoch=None):
    """Own `out` (a demo folder), lay the digits out in out/data once, and train on them into out/run:
    an ordinary run (run.run); run again, it says the run is finished."""
    from imgcls import run

    with rundir.claim(out, "demo"):
        root = out / "data"
        if not (root / "training").is_dir():
            write_digits(root)
        resolved = config.resolve_given(defaults={**DEMO_SETTINGS, "cache_dir": str(out / "cache")},
                                        overrides=overrides if isinstance(overrides, dict) else list(overrides))
        return run.run(run.spec_for(root, out / "run", resolved), log=log, on_epoch=on_epoch)
