"""Time to accuracy: imgcls against the data pipeline of timm's train.py, in one invocation.

Both sides train the same model from the same initial weights (same seed), at the same image
size, epochs, batch size, optimizer (SGD + Nesterov, lr per 512 images, no weight decay on
norms/biases), warmup + per-step cosine schedule, label smoothing and augmentation
(random-resized crop + horizontal flip, nothing else), and both evaluate on the same held-out
images (a stratified part of the labelled training images; tiny-imagenet's test labels are not
given) after every epoch, as timm's train.py does.

  (a) imgcls: `config.resolve` -> `data.prepare` (decodes every image once into a fresh uint8
      cache; its time is part of imgcls's wall time and is also shown alone) -> `run.run`.
  (b) timm: `timm.data.create_dataset` on an ImageFolder view (symlinks under /tmp) of the same
      images, `create_loader` (train.py's defaults: prefetcher on, num_workers = cores) with
      `create_transform`'s train/eval transforms, `create_optimizer_v2`, `CosineLRScheduler`
      stepped per update and `LabelSmoothingCrossEntropy`, in the plain loop of train.py's
      `train_one_epoch` / `validate`. The workers decode and augment every image every epoch.

By default both sides use the same precision and memory format: bf16 autocast where imgcls's
amp=auto turns it on (CUDA, and the CPUs hardware.native_bf16 names; `--amp off` for fp32) and channels_last.
timm's train.py defaults to neither: `--timm-amp off --timm-channels-last off` runs timm's side as
a user who runs train.py without those flags gets it, against imgcls's defaults. The imgcls command
line also keeps freed memory in its process (`process.keep_freed_memory`, glibc's malloc settings);
by default timm's side runs first without it and imgcls's after it is set, as the two programs would
run (`--keep-freed-memory both|none` to give both sides the same). Besides the figures of each side it
prints where the wall time went: imgcls's data/model/eval seconds from its metrics.jsonl, and for
timm the time spent waiting for the loader's workers (train.py's data_time), in the model step and
in evaluation.

    # CPU (4 minutes with bf16, 7 in fp32 on a 2-core Xeon; 11-14 in fp32 on a 2-core AVX2 EPYC VM):
    # a small model, 64 px, a tiny-imagenet-100 subset
    flock /tmp/imgcls-cpu.lock python benchmarks/time_to_accuracy.py
    # GPU: tiny-imagenet-100 whole (10% held out), 64 px, ResNet-18 for small inputs
    python benchmarks/time_to_accuracy.py --device cuda --model resnet18s --width 64 --classes 100 \\
        --per-class 500 --held-out 0.1 --epochs 16 --batch 512 --lr 0.4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imgcls import config, data, layouts, process, run

# torch, timm and imgcls.train (which imports torch) are imported inside the functions: the cache
# build starts its decoding workers with `spawn`, which re-imports this file in each worker, and a
# torch import there costs seconds a worker that `imgcls train` (light CLI imports) never pays.


@dataclass(frozen=True)
class Recipe:
    """Every setting both sides share."""
    model: str
    width: int  # 0 = the model's default
    size: int  # px
    epochs: int
    batch: int
    lr: float  # per 512 images (both sides scale it the same way)
    weight_decay: float
    momentum: float
    warmup_epochs: float
    smoothing: float
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: float
    seed: int
    device: str  # cpu | cuda
    amp: bool  # bf16 autocast on imgcls's side (its amp=auto rule)
    timm_amp: bool  # on timm's side (train.py: --amp --amp-dtype bfloat16; off by default)
    channels_last: bool  # imgcls's memory format
    timm_channels_last: bool  # timm's (train.py: --channels-last, off by default)
    eval_batch: int


@dataclass(frozen=True)
class TimmRecipe:
    """timm's side when it trains with a recipe of its own (benchmarks/budget.py) instead of the shared
    Recipe: train.py's options by name."""
    opt: str  # --opt
    lr: float  # the learning rate itself (train.py: --lr, or --lr-base scaled to the batch)
    weight_decay: float
    warmup_epochs: float
    smoothing: float  # --smoothing (cross entropy), or with bce=True BinaryCrossEntropy's
    bce: bool = False  # --bce-loss
    mixup: float = 0.0  # --mixup
    cutmix: float = 0.0  # --cutmix
    auto_augment: str | None = None  # --aa, e.g. rand-m6-mstd0.5-inc1
    color_jitter: float | None = None  # --color-jitter (None: off)
    scale: tuple[float, float] = (0.08, 1.0)  # --scale
    momentum: float = 0.9


@dataclass
class Outcome:
    name: str
    wall: float  # s, from the first file read to the final accuracy
    prepare: float  # s of wall spent before the first step (imgcls: the cache build)
    train_images: int
    epochs: int
    accuracy: float  # final held-out top-1 after the last epoch
    curve: list[float]  # held-out accuracy after each epoch
    parts: dict[str, float]  # s: where the wall time went (data = batches made or waited for)

    @property
    def images_per_second(self) -> float:
        return self.train_images * self.epochs / self.wall


# --- the shared data: a subset of the labelled images, split once, as a folder of symlinks ---

def labelled(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Every labelled image of a dataset imgcls reads (train + val splits), with its label."""
    ds = layouts.read(root)
    ds.check()
    samples = [s for split in ("train", "val") for s in ds.splits.get(split, [])]
    return [s.path for s in samples], np.array([s.label for s in samples]), ds.classes


def choose(labels: np.ndarray, *, classes: int, per_class: int) -> np.ndarray:
    """Positions of the first `per_class` images (in listing order) of the first `classes` classes."""
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(classes)]
    return np.concatenate(keep)


def make_view(view: Path, paths: list[Path], labels: np.ndarray, class_names: list[str],
              held: np.ndarray) -> None:
    """view/train/<class>/<file> and view/val/<class>/<file> as symlinks to the originals. Class
    folders are named NNN_<class> so imgcls's sorted order and timm's natural-key order agree. A file
    whose name is taken (food-11's training/0_0.jpg and validation/0_0.jpg) gets its folder's name before it."""
    held_set = set(held.tolist())
    for i, (path, label) in enumerate(zip(paths, labels)):
        folder = view / ("val" if i in held_set else "train") / f"{label:03d}_{class_names[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / path.name
        if link.is_symlink():
            link = folder / f"{path.parent.name}-{path.name}"
        link.symlink_to(path.resolve())


def read_all(view: Path) -> None:
    """Read every file once, so both sides find the images in the OS page cache."""
    for p in sorted(view.rglob("*")):
        if p.is_file():
            p.read_bytes()


# --- (a) imgcls ---------------------------------------------------------------------------------

def run_imgcls(view: Path, r: Recipe, work: Path) -> Outcome:

    overrides = {
        "model": r.model, "width": r.width, "image_size": r.size, "epochs": r.epochs, "batch_size": r.batch,
        "lr": r.lr, "weight_decay": r.weight_decay, "momentum": r.momentum, "nesterov": True,
        "warmup_epochs": r.warmup_epochs, "min_lr_ratio": 0.0, "label_smoothing": r.smoothing, "ema": 0.0,
        "crop_scale": r.crop_scale, "crop_ratio": r.crop_ratio, "hflip": r.hflip, "seed": r.seed,
        "device": r.device, "amp": "bf16" if r.amp else "off", "channels_last": str(r.channels_last).lower(),
        "eval_batch_size": r.eval_batch, "cache_dir": str(work / "cache"), "progress": False,
    }
    t0 = time.perf_counter()
    resolved = config.resolve_given(overrides=overrides)
    prep = data.prepare(view, resolved.cfg, progress=False)  # a fresh cache_dir: always a real build
    prepared = time.perf_counter() - t0
    result = run.run(run.spec_for(view, work / "imgcls-run", resolved, report=False), prep=prep)
    wall = time.perf_counter() - t0
    parts = {k: sum(m[f"{k}_seconds"] for m in result.metrics) for k in ("data", "model", "eval")}
    return Outcome("imgcls", wall, prepared, len(prep.rows["train"]), result.epochs_done, result.final_val_acc,
                   [m["val_acc"] for m in result.metrics], parts)


# --- (b) timm's train.py pipeline ------------------------------------------------------------------

def shared_timm_recipe(r: Recipe) -> TimmRecipe:
    """The shared Recipe as timm's options: both sides train alike."""
    from imgcls import optim

    return TimmRecipe(opt="sgd", lr=optim.peak_lr(config.OptimConfig(lr=r.lr), r.batch), weight_decay=r.weight_decay,
                      warmup_epochs=r.warmup_epochs, smoothing=r.smoothing, scale=r.crop_scale, momentum=r.momentum)


def run_timm(view: Path, r: Recipe, work: Path, *, workers: int, t: TimmRecipe | None = None) -> Outcome:
    """timm's train.py pipeline on the view; `t`: timm's own recipe (default: the shared one)."""
    import timm.data
    import timm.loss
    import timm.optim
    import timm.scheduler
    import torch

    from imgcls.models import create_model

    t = t or shared_timm_recipe(r)
    device = torch.device(r.device)
    t0 = time.perf_counter()
    torch.manual_seed(r.seed)  # the same initial weights as imgcls's fit() (it seeds, then builds the model)
    model = create_model(r.model, len(os.listdir(view / "train")), width=r.width)
    memory_format = torch.channels_last if r.timm_channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    train_set = timm.data.create_dataset("", root=str(view / "train"), split="train", is_training=True)
    eval_set = timm.data.create_dataset("", root=str(view / "val"), split="validation")
    common = dict(input_size=(3, r.size, r.size), interpolation="bilinear", num_workers=workers, device=device,
                  use_prefetcher=True, pin_memory=device.type == "cuda")
    train_loader = timm.data.create_loader(
        train_set, batch_size=r.batch, is_training=True, scale=t.scale, ratio=r.crop_ratio, hflip=r.hflip,
        color_jitter=t.color_jitter, auto_augment=t.auto_augment, **common)  # None: no jitter (train.py: 0.4)
    # crop_pct=1, squash: the whole image resized to size, the view imgcls evaluates on (its cache rows).
    eval_loader = timm.data.create_loader(eval_set, batch_size=r.eval_batch, is_training=False, crop_pct=1.0,
                                          crop_mode="squash", **common)
    optimizer = timm.optim.create_optimizer_v2(model, opt=t.opt, lr=t.lr, weight_decay=t.weight_decay,
                                               momentum=t.momentum)  # sgd = Nesterov
    steps = len(train_loader)
    warmup = int(t.warmup_epochs * steps)
    peak = optimizer.param_groups[0]["lr"]
    scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=max(1, r.epochs * steps - warmup), lr_min=0.0,
                                                 warmup_t=warmup, warmup_lr_init=peak / max(1, warmup),
                                                 warmup_prefix=True, t_in_epochs=False)
    mixup = (timm.data.Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.smoothing,
                             num_classes=len(os.listdir(view / "train"))) if t.mixup or t.cutmix else None)
    if t.bce:  # train.py --bce-loss: BinaryCrossEntropy over (mixed, smoothed) targets
        loss_fn = timm.loss.BinaryCrossEntropy(smoothing=0.0 if mixup else t.smoothing)
    elif mixup:
        loss_fn = timm.loss.SoftTargetCrossEntropy()
    else:
        loss_fn = timm.loss.LabelSmoothingCrossEntropy(t.smoothing)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=r.timm_amp)  # noqa: E731
    prepared = time.perf_counter() - t0

    curve, updates, parts = [], 0, {"data": 0.0, "model": 0.0, "eval": 0.0}
    for epoch in range(r.epochs):
        model.train()  # train.py's train_one_epoch, without its logging
        t1 = time.perf_counter()
        for images, labels in train_loader:
            t2 = time.perf_counter()
            parts["data"] += t2 - t1  # waiting for the workers (train.py's data_time)
            images = images.contiguous(memory_format=memory_format)
            if mixup:
                images, labels = mixup(images, labels)
            with autocast():
                logits = model(images)
            loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
            t1 = time.perf_counter()
            parts["model"] += t1 - t2
        model.eval()  # train.py's validate
        correct = seen = 0
        with torch.no_grad():
            for images, labels in eval_loader:
                with autocast():
                    logits = model(images.contiguous(memory_format=memory_format))
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
        curve.append(correct / seen)
        parts["eval"] += time.perf_counter() - t1
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, work / "timm-last.pth")
    return Outcome("timm", time.perf_counter() - t0, prepared, len(train_set), r.epochs, curve[-1], curve, parts)


# --- main -----------------------------------------------------------------------------------------

def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    return (out.stdout.strip() or "?") + ("+working tree" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    import torch

    from imgcls import hardware

    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/work/data/tiny-imagenet-100", help="a dataset folder imgcls reads")
    p.add_argument("--classes", type=int, default=20, help="the first N classes (in the dataset's class order)")
    p.add_argument("--per-class", type=int, default=500, help="the first M labelled images of each class")
    p.add_argument("--held-out", type=float, default=0.2, help="stratified fraction both sides evaluate on")
    p.add_argument("--model", default="tinycnn", help="a registered imgcls model or timm:<name>, built the same way on both sides")
    p.add_argument("--width", type=int, default=16, help="first-stage channels (0 = the model's default)")
    p.add_argument("--size", type=int, default=64, help="px")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.4, help="peak learning rate per 512 images")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.35, 1.0))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast on both sides (auto: imgcls's rule, on cuda and on the CPUs "
                        "hardware.native_bf16 names)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="both sides (auto: imgcls's rule, on with amp and on the CPU)")
    p.add_argument("--timm-channels-last", choices=["same", "on", "off"], default="same",
                   help="timm's side alone (off: train.py's default)")
    p.add_argument("--timm-amp", choices=["same", "on", "off"], default="same",
                   help="timm's side alone (off: train.py's default, fp32)")
    p.add_argument("--workers", type=int, default=cores, help="timm DataLoader workers (train.py: --workers)")
    p.add_argument("--only", choices=["imgcls", "timm"], help="run one side (for profiling)")
    p.add_argument("--keep-freed-memory", choices=["imgcls", "both", "none"], default="imgcls",
                   help="who runs with process.keep_freed_memory(), which the imgcls command line calls for its "
                        "process (imgcls: timm's side runs first, with glibc's malloc as it comes, then imgcls's)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible here")

    amp = args.amp == "on" or (args.amp == "auto" and (args.device == "cuda" or hardware.native_bf16()))
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and (amp or args.device == "cpu"))
    recipe = Recipe(model=args.model, width=args.width, size=args.size, epochs=args.epochs, batch=args.batch,
                    lr=args.lr, weight_decay=args.weight_decay, momentum=0.9, warmup_epochs=1.0, smoothing=0.1,
                    crop_scale=tuple(args.crop_scale), crop_ratio=(3 / 4, 4 / 3), hflip=0.5, seed=args.seed,
                    device=args.device, amp=amp, timm_amp={"same": amp, "on": True, "off": False}[args.timm_amp],
                    channels_last=channels_last, timm_channels_last={"same": channels_last, "on": True,
                                                                     "off": False}[args.timm_channels_last],
                    eval_batch=512)
    paths, labels, class_names = labelled(Path(args.data))
    if args.classes > len(class_names):
        p.error(f"--classes {args.classes}: {args.data} has {len(class_names)} classes")
    chosen = choose(labels, classes=args.classes, per_class=args.per_class)
    _, held = data.stratified_split(labels[chosen], args.held_out, seed=args.seed)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{cores}-core CPU ({torch.backends.cpu.get_cpu_capability()})"
    print(f"{time.strftime('%Y-%m-%d')}, commit {commit()}, {device_name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"data: {args.data}, {args.classes} classes x {args.per_class} = {len(chosen)} images, "
          f"{len(held)} held out (stratified, seed {args.seed})")
    print("recipe: " + ", ".join(f"{k}={v}" for k, v in asdict(recipe).items()) + f"; timm workers={args.workers}; "
          f"keep_freed_memory: {args.keep_freed_memory}")

    work = Path(tempfile.mkdtemp(prefix="imgcls-tta-", dir="/tmp"))
    try:
        view = work / "view"
        make_view(view, [paths[i] for i in chosen], labels[chosen], class_names, held)
        read_all(view)
        outcomes = {}
        if args.keep_freed_memory == "both":
            process.keep_freed_memory()
        if args.only in (None, "timm"):  # first: the malloc settings, once made, stay for the process
            outcomes["timm"] = run_timm(view, recipe, work, workers=args.workers)
        if args.only in (None, "imgcls"):
            if args.keep_freed_memory == "imgcls":
                process.keep_freed_memory()
            outcomes["imgcls"] = run_imgcls(view, recipe, work)
        outcomes = [outcomes[k] for k in ("imgcls", "timm") if k in outcomes]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'pipeline':8s} {'wall s':>8s} {'of which prep s':>15s} {'images/s':>9s} {'held-out acc':>12s}   per epoch")
    for o in outcomes:
        what = "cache build" if o.name == "imgcls" else "setup"
        print(f"{o.name:8s} {o.wall:8.1f} {o.prepare:9.1f} ({what}) {o.images_per_second:9.0f} {o.accuracy:12.4f}   "
              + " ".join(f"{a:.3f}" for a in o.curve))
    for o in outcomes:
        rest = o.wall - o.prepare - sum(o.parts.values())
        print(f"{o.name:8s} wall = prep {o.prepare:.1f} + " + " + ".join(f"{k} {v:.1f}" for k, v in o.parts.items())
              + f" + other {rest:.1f} s (other: model set-up, checkpoints, the final pass over the held-out images)")
    if len(outcomes) == 2:
        ours, theirs = outcomes
        print(f"wall-time ratio timm/imgcls: {theirs.wall / ours.wall:.2f}x; "
              f"accuracy imgcls - timm: {100 * (ours.accuracy - theirs.accuracy):+.1f} points")
    if args.json:
        args.json.write_text(json.dumps({"recipe": asdict(recipe), "outcomes": [
            {**asdict(o), "images_per_second": o.images_per_second} for o in outcomes]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
