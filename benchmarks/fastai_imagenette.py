"""fastai's Imagenette leaderboard recipe on an imagefolder view (issue 35): fastai's own data pipeline,
model, optimizer and schedule, called through fastai's public API. Run with the fastai virtual
environment's python (fastai is never an imgcls dependency; setup: benchmarks/fastai-requirements.txt);
benchmarks/budget.py runs it as its `fastai` (xresnet50) and `fastai18` (xresnet18) rows.

    /work/venvs/fastai/bin/python benchmarks/fastai_imagenette.py --data VIEW --epochs 5 --seed 0 \
        --arch xresnet50 --out DIR [--limit 20]

VIEW holds train/<class>/ and val/<class>/ (budget.py's view_of). Prints one line per epoch and writes
DIR/result.json: held-out accuracy per epoch (fastai's `accuracy` on val/), the final one, and wall
seconds from the start of main() (imports, file listing and the worker start-up included).

Where each setting comes from ("script" = fastai/fastai nbs/examples/train_imagenette.py at commit
52ff7b4, with its line; "leaderboard" = fastai/imagenette 2020-01-train.md, the flags of fastai's own
leaderboard runs: --lr 8e-3 --sqrmom 0.99 --mom 0.95 --eps 1e-6 --bs 64 --opt ranger --sa 1 --fp16 1
--arch xse_resnext50 --pool MaxPool, no mixup at 5 and 20 epochs). Where the two differ the leaderboard
wins, except the model: xresnet50 (script L60's default) and xresnet18 (the size of imgcls's default
model), as issue 35 asks; `--arch xse_resnext50` is the leaderboard's own.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

ARCHS = ("xresnet50", "xresnet18", "xse_resnext50")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="an imagefolder view: train/<class>/, val/<class>/")
    p.add_argument("--out", type=Path, required=True, help="folder for result.json")
    p.add_argument("--epochs", type=int, default=5)  # script L56; the leaderboard's budgets are 5, 20, 80, 200
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=ARCHS, default="xresnet50")  # script L60
    p.add_argument("--size", type=int, default=128)  # script L51; leaderboard row "128 px"
    p.add_argument("--bs", type=int, default=64)  # script L57, leaderboard --bs 64
    p.add_argument("--lr", type=float, default=8e-3)  # leaderboard --lr 8e-3 (script L50's default is 1e-2)
    p.add_argument("--mom", type=float, default=0.95)  # leaderboard --mom 0.95 (script L53: 0.9)
    p.add_argument("--pool", choices=("MaxPool", "AvgPool"), default="MaxPool")  # leaderboard (script L67: AvgPool)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workers", type=int, help="data loader processes (default fastai's: min(8, cores), script L21)")
    p.add_argument("--limit", type=int, default=0, help="the first N images of each class in each split (smoke runs)")
    p.add_argument("--channels-last", action="store_true", help="fastai's ChannelsLast callback (not in the recipe)")
    return p.parse_args(argv)


def first_per_folder(files: list[Path], limit: int) -> list[Path]:
    """The first `limit` files of each class folder (sorted), all of them when limit is 0."""
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for f in sorted(files):
        by_folder[f.parent].append(f)
    return [f for group in by_folder.values() for f in (group[:limit] if limit else group)]


def image_files(path: Path, limit: int) -> list[Path]:
    from fastai.vision.all import L, get_image_files

    return L(first_per_folder(list(get_image_files(path)), limit))


def dataloaders(view: Path, *, size: int, bs: int, workers: int, limit: int):
    """fastai's data pipeline as the script builds it (L22-24, L36-44): PIL decode per item, then
    RandomResizedCrop(min_scale=0.35) + FlipItem(0.5) per item (on val/, fastai's centre crop), Normalize
    with ImageNet statistics per batch; labels from the class folder, split by the grandparent folder."""
    from fastai.vision.all import (CategoryBlock, DataBlock, FlipItem, GrandparentSplitter, ImageBlock, Normalize,
                                   RandomResizedCrop, imagenet_stats, parent_label)

    block = DataBlock(blocks=(ImageBlock, CategoryBlock), splitter=GrandparentSplitter(valid_name="val"),
                      get_items=partial(image_files, limit=limit), get_y=parent_label,
                      item_tfms=[RandomResizedCrop(size, min_scale=0.35), FlipItem(0.5)],
                      batch_tfms=[Normalize.from_stats(*imagenet_stats)])
    return block.dataloaders(view, path=view, bs=bs, num_workers=workers)


def epoch_printer(start: float, rows: list[dict]):
    """A callback that appends each epoch's recorded values to `rows` and prints them on one line."""
    from fastai.vision.all import Callback, Recorder

    class EpochLog(Callback):
        order = Recorder.order + 1  # after the Recorder has scored val/ and stored the epoch's values

        def after_epoch(self):
            names = self.recorder.metric_names[1:-1]  # train_loss valid_loss accuracy ("epoch", "time" dropped)
            row = {"epoch": self.epoch + 1, **dict(zip(names, map(float, self.recorder.values[-1]))),
                   "elapsed": time.time() - start}
            rows.append(row)
            print(f"epoch {row['epoch']:3d}  train_loss {row['train_loss']:.4f}  valid_loss {row['valid_loss']:.4f}"
                  f"  accuracy {row['accuracy']:.4f}  elapsed {row['elapsed']:.0f}s", flush=True)

    return EpochLog()


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    args = parse(argv)
    import fastai
    import fastcore
    import torch
    import torchvision
    from fastai.vision.models import xresnet
    from fastai.vision.all import (AvgPool, LabelSmoothingCrossEntropy, Learner, MaxPool, Mish, accuracy, num_cpus,
                                   ranger, set_seed)

    if args.threads:
        torch.set_num_threads(args.threads)
    workers = min(8, num_cpus()) if args.workers is None else args.workers  # script L21
    set_seed(args.seed, reproducible=True)  # seeds random, numpy and torch; fastai's workers derive theirs
    dls = dataloaders(args.data, size=args.size, bs=args.bs, workers=workers, limit=args.limit)
    # script L81, L85: the model with Mish (L65 act_fn='Mish'), self-attention (leaderboard --sa 1; L62),
    # sym=0 (L63) and the pooling of the shortcuts (see --pool); one output per class (L85 has n_out=10).
    model = getattr(xresnet, args.arch)(n_out=dls.c, act_cls=Mish, sa=True, sym=False,
                                        pool={"MaxPool": MaxPool, "AvgPool": AvgPool}[args.pool])
    # script L77: ranger (RAdam + Lookahead) with sqr_mom 0.99 (L52), eps 1e-6 (L54), beta 0 (L64), mom per --mom.
    opt_func = partial(ranger, mom=args.mom, sqr_mom=0.99, eps=1e-6, beta=0.0)
    rows: list[dict] = []
    # script L85-86: label smoothing (fastai's default eps 0.1) and the accuracy metric (top_k_accuracy dropped:
    # top-5 of 10 classes says little, as imagenette's README notes).
    learn = Learner(dls, model, opt_func=opt_func, loss_func=LabelSmoothingCrossEntropy(), metrics=[accuracy],
                    path=args.out, cbs=[epoch_printer(start, rows)])
    if torch.cuda.is_available():
        learn = learn.to_native_fp16()  # script L88, leaderboard --fp16 1: fastai's MixedPrecision is CUDA-only
    if args.channels_last:
        learn = learn.to_channelslast(use_amp=False)
    args.out.mkdir(parents=True, exist_ok=True)
    prepare = time.time() - start
    with learn.no_bar(), learn.no_logging():  # our callback prints instead of the bar and the Recorder
        # script L93: flat at lr for 75% of the steps, then cosine to lr/1e5 (fastai's fit_flat_cos defaults);
        # wd 1e-2 (L55), decoupled (ranger's default), none on norm and bias (Learner's wd_bn_bias=False). No
        # mixup (L58; leaderboard: none at 5 and 20 epochs).
        learn.fit_flat_cos(args.epochs, args.lr, wd=1e-2)
    wall = time.time() - start
    result = {
        "arch": args.arch, "size": args.size, "bs": args.bs, "lr": args.lr, "mom": args.mom, "pool": args.pool,
        "epochs": args.epochs, "seed": args.seed, "threads": torch.get_num_threads(), "workers": workers,
        "limit": args.limit, "channels_last": args.channels_last, "device": str(dls.device),
        "train_images": len(dls.train_ds), "valid_images": len(dls.valid_ds), "classes": list(dls.vocab),
        "accuracy": rows[-1]["accuracy"], "curve": [r["accuracy"] for r in rows], "epochs_log": rows,
        "prepare_seconds": prepare, "wall": wall,
        "versions": {"fastai": fastai.__version__, "fastcore": fastcore.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "python": platform.python_version()},
        "argv": sys.argv,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.arch} {args.epochs} epochs seed {args.seed}: accuracy {result['accuracy']:.4f} "
          f"({result['valid_images']} held-out images), wall {wall:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
