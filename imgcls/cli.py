"""The command line: the only module that reads argv and prints. Exit 0 ok, 1 user error, 2 usage."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from imgcls import __version__
from imgcls.errors import UserError

# Per-layout defaults, under the user's YAML and key=value overrides.
LAYOUT_DEFAULTS = {
    "food-11": {"image_size": 128},
    "tiny-imagenet": {"image_size": 64},
    "imagefolder": {},
}

COMMANDS = {}


def command(fn):
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


def resolve_config(data: str | None, args) -> "config.Config":
    from imgcls import config, layouts

    defaults = LAYOUT_DEFAULTS[layouts.detect(Path(data).expanduser())] if data and Path(data).is_dir() else {}
    return config.resolve(defaults=defaults, file=getattr(args, "config", None), overrides=args.overrides)


def print_epoch(m: dict) -> None:
    from tqdm.auto import tqdm

    val = f" val_loss {m['val_loss']:.4f} val_acc {m['val_acc']:.4f}" if "val_acc" in m else ""
    tqdm.write(f"epoch {m['epoch']:>3}  train_loss {m['train_loss']:.4f} train_acc {m['train_acc']:.4f}{val}  "
               f"lr {m['lr']:.3g}  {m['seconds']:.1f}s  {m['images_per_second']:.0f} img/s "
               f"(data {m['data_seconds']:.1f}s, model {m['model_seconds']:.1f}s)")


def describe_dataset(ds) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in ds.counts().items())
    return f"{ds.root}: {ds.layout} layout, {ds.num_classes} classes, {counts}"


@command
def cmd_inspect(args) -> int:
    from imgcls import cache, config, layouts

    ds = layouts.read(args.data)
    print(describe_dataset(ds))
    names = ds.classes[:10]
    print(f"classes: {', '.join(names)}{' ...' if ds.num_classes > 10 else ''}")
    for w in ds.warnings:
        print(f"warning: {w}")
    cfg = resolve_config(args.data, args)
    samples = [s for split in ds.splits.values() for s in split]
    built = cache.build([s.path for s in samples], size=cfg.data.cache_size or cfg.data.image_size,
                        resize=cfg.data.resize, cache_dir=cfg.data.cache_dir, workers=cfg.data.decode_workers,
                        name=f"{ds.layout}-{ds.root.name}")
    for i, why in sorted(built.failed.items()):
        print(f"unreadable: {samples[i].path}: {why}")
    for e in ds.errors:
        print(f"error: {e}")
    print(f"{len(built.failed)} unreadable file(s), {len(ds.errors)} error(s)")
    return 1 if ds.errors or built.failed else 0


@command
def cmd_train(args) -> int:
    from imgcls import data, train

    cfg = resolve_config(args.data, args)
    prep = data.prepare(args.data, cfg, progress=cfg.run.progress)
    print(describe_dataset(prep.dataset))
    print(f"cache: {prep.cache_path} ({'built' if prep.cache_built else 'reused'})")
    if prep.skipped:
        print(f"skipped {len(prep.skipped)} unreadable training image(s):")
        for path, why in prep.skipped.items():
            print(f"  {path}: {why}")
    t0 = time.time()
    result = train.fit(cfg, prep, args.out, on_epoch=print_epoch)
    print(f"best val_acc {result.best_val_acc:.4f} at epoch {result.best_epoch}, "
          f"final val_acc {result.final_val_acc:.4f}, {time.time() - t0:.0f}s")
    if result.stopped != "done":
        print(f"stopped early ({result.stopped}) after {result.epochs_done} epoch(s). Resume with:\n"
              f"  imgcls train {args.data} --out {args.out} resume={args.out}")
    if result.submission:
        print(f"submission: {result.submission}")
    print(f"run: {result.run_dir}")
    return 0 if result.stopped != "interrupted" else 130


@command
def cmd_predict(args) -> int:
    from imgcls import config, data, hardware, predict, submission

    hw = hardware.resolve(config.RunConfig(device=args.device))
    runs = [predict.load_run(r, hw=hw) for r in args.runs]
    prep = data.prepare(args.data, runs[0].cfg, progress=True)
    rows = prep.rows.get("test")
    if rows is None or len(rows) == 0:
        raise UserError(f"{args.data} has no test split to predict.")
    probs = 0
    for run in runs:
        if run.classes != prep.classes:
            raise UserError(f"{run.path} was trained on classes {run.classes[:5]}..., which differ from "
                            f"{args.data}'s {prep.classes[:5]}...")
        run_prep = prep if run.cfg.data == runs[0].cfg.data else data.prepare(args.data, run.cfg)
        logits = predict.infer(run.model, run_prep.images, run_prep.rows["test"], size=run.cfg.data.image_size, hw=hw)
        probs = probs + logits.softmax(1) / len(runs)
    ids = [prep.ids[i] for i in rows]
    path = submission.write(prep.dataset, dict(zip(ids, probs.argmax(1).tolist())), args.out)
    print(f"submission: {path} ({len(ids)} rows)")
    return 0


@command
def cmd_demo(args) -> int:
    from imgcls import demo

    t0 = time.time()
    result = demo.run(Path(args.out), overrides=args.overrides, on_epoch=print_epoch)
    print(f"demo: best val_acc {result.best_val_acc:.4f} (chance 0.10) in {time.time() - t0:.0f}s")
    print(f"submission: {result.submission}\nrun: {result.run_dir}")
    return 0


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="imgcls", description="Train image classifiers from scratch and write "
                                "correct competition submissions.")
    p.add_argument("--version", action="version", version=f"imgcls {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def overrides(sp):
        sp.add_argument("--config", help="YAML file of settings (see configs/)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. epochs=30 lr=0.1")

    sp = sub.add_parser("inspect", help="detect the layout, count images, list unreadable files")
    sp.add_argument("data")
    overrides(sp)
    sp = sub.add_parser("train", help="train a model and write the run directory and submission")
    sp.add_argument("data")
    sp.add_argument("--out", required=True, help="run directory")
    overrides(sp)
    sp = sub.add_parser("predict", help="write a submission from one or more trained runs")
    sp.add_argument("runs", nargs="+", metavar="RUN")
    sp.add_argument("--data", required=True)
    sp.add_argument("--out", required=True, help="submission CSV to write")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp = sub.add_parser("demo", help="train on a small dataset bundled with scikit-learn; no data needed")
    sp.add_argument("--out", required=True)
    sp.add_argument("overrides", nargs="*", metavar="key=value")
    return p, sub.choices


def main(argv: list[str] | None = None) -> int:
    top, commands = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in commands:
        top.parse_args(argv)  # --help, --version, or a usage error (exit 2)
    # Intermixed: `train DATA --out RUN epochs=3` and `train DATA epochs=3 --out RUN` both work.
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"imgcls {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
