"""Augmented-batch throughput: imgcls (decode-once uint8 cache -> normalized, augmented batch on
the device) vs a classic torch DataLoader (PIL decode + torchvision transforms in num_workers =
cores processes), on the same training images, the same crop/flip/jitter, in one invocation.

    flock /tmp/imgcls-cpu.lock python benchmarks/pipeline.py [--data /work/data/food-10] [--size 128]
        [--batch 128] [--epochs 3] [--device auto|cpu|cuda] [--components] [key=value ...]

Images/s is the median over epochs of (images / wall seconds of one pass over the training
split). The DataLoader keeps its workers between epochs (persistent_workers) and its first pass,
which pays the worker start-up, is not counted. The imgcls cache is built once (its time is
printed) and reused by every later run. `--components` also times each augmentation step of
imgcls against kornia's augmentation modules on one batch (the figures quoted in imgcls/augment.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from imgcls import augment, config, data, hardware, process

# The aug section of the food11 preset: what a food-11 run does by default.
FOOD11_AUG = ["crop_scale=0.25,1.0", "hflip=0.5", "brightness=0.2", "contrast=0.2", "saturation=0.2"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the GPU runs ahead of Python: wait before reading the clock


def imgcls_epochs(images: torch.Tensor, labels: torch.Tensor, cfg, *, batch: int, epochs: int,
                  device: torch.device) -> list[float]:
    """images/s of each pass: rows of the cache -> one_hot -> train_views -> normalize."""
    pipeline = augment.build_train_pipeline(cfg.aug, size=cfg.data.image_size)
    order_gen = torch.Generator().manual_seed(0)
    aug_gen = hardware.make_generator(device, 1)
    num_classes = int(labels.max()) + 1
    rates = []
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=order_gen)
        sync(device)
        t0, seen = time.perf_counter(), 0
        for step in range(len(images) // batch):
            rows = perm[step * batch:(step + 1) * batch].to(images.device)
            targets = augment.one_hot(labels[rows].to(device), num_classes, 0.1)
            x, targets = augment.train_views(images.index_select(0, rows).to(device, non_blocking=True), targets,
                                             aug_gen, pipeline)
            seen += len(x)
        sync(device)
        rates.append(seen / (time.perf_counter() - t0))
    return rates


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], labels: list[int], transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def dataloader_epochs(paths: list[Path], labels: list[int], cfg, *, batch: int, epochs: int,
                      workers: int) -> list[float]:
    """images/s of each pass of a classic DataLoader with the same crop/flip/jitter (first pass dropped)."""
    import torchvision.transforms.v2 as T

    a = cfg.aug
    transform = T.Compose([
        T.RandomResizedCrop(cfg.data.image_size, scale=a.crop_scale, ratio=a.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(a.hflip),
        T.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue),
        T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(augment.MEAN, augment.STD)])
    loader = torch.utils.data.DataLoader(PILDataset(paths, labels, transform), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    rates = []
    for _ in range(epochs + 1):
        t0, seen = time.perf_counter(), 0
        for x, _ in loader:
            seen += len(x)
        rates.append(seen / (time.perf_counter() - t0))
    return rates[1:]


def components(images_u8: torch.Tensor, cfg, *, device: torch.device, reps: int = 7) -> list[tuple[str, float]]:
    """Median ms per batch of each imgcls step and of the kornia module doing the same."""
    import kornia.augmentation as K
    import kornia.augmentation.auto as KA

    size = cfg.data.image_size
    g = hardware.make_generator(device, 0)
    u8 = images_u8.to(device)
    x = augment.to_float(u8)
    x = augment.resize(x, size)
    t = torch.zeros(len(u8), 1, device=device)
    a = cfg.aug
    geo = dict(size=size, scale=a.crop_scale, ratio=a.crop_ratio, hflip=a.hflip, rotate=0.0, translate=0.0)
    kornia_rrc = torch.nn.Sequential(K.RandomResizedCrop((size, size), scale=a.crop_scale, ratio=a.crop_ratio),
                                     K.RandomHorizontalFlip(p=a.hflip))
    jitter = dict(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)
    kornia_jitter = K.ColorJitter(**jitter, p=1.0)
    x_full = augment.to_float(u8)
    rows = u8.permute(0, 3, 1, 2)  # what the first step gets: the uint8 cache rows as [B, 3, H, W]
    crops = augment.geometric(rows, t, g, **geo)[0]  # uint8 on the CPU, float on the GPU
    cases = [
        ("uint8 rows -> float NCHW (as_float)", lambda: augment.to_float(u8)),
        ("uint8 rows -> float, .float() on the channels-last view", lambda: rows.float().div_(255)),
        ("geometric: crop+flip (uint8 rows in; CPU: OpenCV resize per image)", lambda: augment.geometric(rows, t, g, **geo)),
        ("geometric: + rotate 15, translate 0.1 (CPU: OpenCV warpAffine)",
         lambda: augment.geometric(rows, t, g, **{**geo, "rotate": 15.0, "translate": 0.1})),
        ("geometric: crop+flip (grid_sample path, float in)", lambda: augment.geometric(x_full, t, g, **geo)),
        ("  kornia RandomResizedCrop + RandomHorizontalFlip", lambda: kornia_rrc(x_full)),
        ("colour: b/c/s 0.2 + hue 0.05 + normalize, from the crop step", lambda: augment.colour(crops, t, g, **jitter)),
        ("colour: the same from float [0, 1] (bmm path)", lambda: augment.colour(x, t, g, **jitter)),
        ("colour: normalize alone, from the crop step", lambda: augment.colour(crops, t, g)),
        ("  kornia ColorJitter(0.2, 0.2, 0.2, 0.05)", lambda: kornia_jitter(x)),
        ("policy: RandAugment 2 ops, magnitude 9", lambda: augment.policy(x, t, g, space="randaugment", num_ops=2, magnitude=9)),
        ("  kornia RandAugment(n=2, m=9) (ops per batch)", lambda: KA.RandAugment(n=2, m=9)(x)),
        ("policy: TrivialAugmentWide", lambda: augment.policy(x, t, g, space="trivialaugment", num_ops=1, magnitude=None)),
        ("  kornia TrivialAugment (op per batch)", lambda: KA.TrivialAugment()(x)),
        ("erase p=0.25", lambda: augment.erase(x, t, g, p=0.25)),
        ("  kornia RandomErasing(p=0.25)", lambda: K.RandomErasing(p=0.25)(x)),
        ("normalize (float [0, 1] in)", lambda: augment.normalize(x)),
    ]
    out = []
    for name, fn in cases:
        fn()
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        out.append((name, 1000 * statistics.median(times)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/work/data/food-10", help="a dataset folder (any layout imgcls reads)")
    p.add_argument("--size", type=int, default=128, help="px, side of the augmented images")
    p.add_argument("--batch", type=int, default=128, help="images per batch (the food11 preset trains with 128)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training split, per pipeline")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where imgcls augments")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers (default: all cores)")
    p.add_argument("--components", action="store_true", help="also time each augmentation step against kornia")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings as they are "
                   "(imgcls's command line calls process.keep_freed_memory)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="imgcls settings (default: the food11 aug)")
    args = p.parse_args(argv)

    if not args.default_malloc:
        process.keep_freed_memory()  # as `imgcls` does; before the DataLoader forks, so its workers get it too
    cfg = config.resolve(overrides=[f"image_size={args.size}", "cache_dir=", *FOOD11_AUG, *args.overrides])
    device = hardware.resolve(config.RunConfig(device=args.device)).device
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d')}, commit {commit or '?'}, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} torch threads, imgcls on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    t0 = time.perf_counter()
    prep = data.prepare(args.data, cfg, progress=False)
    rows = prep.rows["train"]
    print(f"{args.data}: {len(rows)} training images; cache {prep.cache_path} "
          f"({'built' if prep.cache_built else 'reused'} in {time.perf_counter() - t0:.1f} s, once per dataset)")
    print(f"augmentation: {' '.join(FOOD11_AUG + args.overrides)}; {args.size} px; batch {args.batch}")

    images = torch.from_numpy(np.array(prep.images[rows]))
    labels = torch.from_numpy(prep.labels[rows])
    if device.type == "cuda":
        images = images.to(device)
    ours = imgcls_epochs(images, labels, cfg, batch=args.batch, epochs=args.epochs, device=device)
    samples = [s for split in prep.dataset.splits.values() for s in split]  # the cache's row order
    theirs = dataloader_epochs([samples[r].path for r in rows], [samples[r].label for r in rows], cfg,
                               batch=args.batch, epochs=args.epochs, workers=args.workers)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"imgcls     (cache -> augmented batch on {device.type}): {a:8.0f} images/s  "
          f"(epochs: {', '.join(f'{r:.0f}' for r in ours)})")
    print(f"DataLoader (PIL + torchvision, {args.workers} workers):      {b:8.0f} images/s  "
          f"(epochs: {', '.join(f'{r:.0f}' for r in theirs)})")
    print(f"ratio: {a / b:.1f}x")
    if args.components:
        print(f"\nper step, ms per batch of {args.batch} at {args.size} px on {device.type} (median of 7):")
        for name, ms in components(images[:args.batch], cfg, device=device):
            print(f"  {ms:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
