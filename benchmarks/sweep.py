"""Recipe sweep: train arms (sets of key=value settings over a shared base) for some seeds, in one
process, and print held-out accuracy as mean +- s.e. over the seeds, with wall time per run.

    flock /tmp/imgcls.lock python benchmarks/sweep.py --data /work/data/food-10 --epochs 5 --seeds 0,1,2 \\
        --base "image_size=128 cache_size=144" \\
        --arm sgd "optimizer=sgd batch_size=32" --arm adamw "optimizer=adamw batch_size=32" --json sweep.jsonl

Each run is `imgcls.train(data, fresh dir, **base, **arm, seed=s, epochs=E)` on the data's own split
(food-11 layout: training/ -> validation/). `--eval-sizes 128,144,160` also scores the final weights at
those test resolutions (FixRes), `--eval-crops 1,0.875,0.8` on those centre crops of the cache (eval_crop=).
`--ema-shares 0,0.05,0.2,0.3` also keeps averages over about those last shares of the run's steps beside the
run's own EMA (ema=auto: about its last tenth), fed at the same steps, and scores each at the end (0: the raw
weights): the EMA length axis from one run per seed, its training unchanged. `--classes N` trains on the first N classes
only (a symlinked view; `--held-out F` of their labelled images is the validation split). The table at the end
gives every later arm's paired difference against the first arm (the same seeds), the figure a default change
rests on: put the default first.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import imgcls
from imgcls import config, data, optim, process


def parse_settings(text: str) -> dict[str, str]:
    return config.parse_overrides(text.split())


def subset_view(root: Path, work: Path, *, classes: int, held_out: float, seed: int = 0) -> Path:
    """The first `classes` classes of a dataset as an imagefolder of symlinks: train/ and val/ (a
    stratified `held_out` part of the labelled images, seeded)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from time_to_accuracy import choose, labelled, make_view

    paths, labels, names = labelled(root)
    chosen = choose(labels, classes=classes, per_class=10**9)
    _, held = data.stratified_split(labels[chosen], held_out, seed=seed)
    view = work / f"{root.name}-{classes}"
    make_view(view, [paths[i] for i in chosen], labels[chosen], names, held)
    return view


def score_at_sizes(run_dir: Path, data_root: Path, sizes: list[int]) -> dict[int, float]:
    """Held-out accuracy of the run's final (last) weights at other test resolutions."""
    from imgcls import hardware, inference

    cfg = config.resolve(file=run_dir / "config.yaml")
    hw = hardware.resolve(cfg.run)
    run = inference.load_run(run_dir, weights="last", hw=hw)
    out = {}
    for size in sizes:
        sized = config.resolve(defaults=cfg.to_dict(), overrides={"cache_size": max(size, config.cache_size(cfg.data))})
        prep = data.prepare(data_root, sized, progress=False)
        rows = prep.rows["val"]
        logits = inference.infer(run.model, prep.images, rows, size=size, hw=hw)
        out[size] = float((logits.argmax(1) == torch.as_tensor(prep.labels[rows])).float().mean())
    return out


def score_eval_crops(run_dir: Path, data_root: Path, fractions: list[float]) -> dict[float, float]:
    """Held-out accuracy of the run's final weights on plain views of other centre crops (eval_crop=)."""
    from imgcls import hardware, inference

    cfg = config.resolve(file=run_dir / "config.yaml")
    hw = hardware.resolve(cfg.run)
    run = inference.load_run(run_dir, weights="last", hw=hw)
    prep = data.prepare(data_root, cfg, progress=False)
    rows = prep.rows["val"]
    labels = torch.as_tensor(prep.labels[rows])
    return {f: float((inference.infer(run.model, prep.images, rows, size=config.eval_size(cfg.data), hw=hw, crop=f)
                      .argmax(1) == labels).float().mean()) for f in fractions}


def tail_average(share: float):
    """AveragedModel's multi_avg_fn for an average over about the last `share` of the steps so far: an
    EMA whose horizon grows with the step count n (weight 1 / (1 + share * n) on the newest weights), so
    at the end it averages about the last share of the run. optim.ema_update's warm-up (1 + n) / (10 + n)
    caps any EMA's horizon at about n / 9 steps, so fixed decays cannot ask for a longer tail than
    ema=auto's tenth of the run: shares of 0.2 and 0.3 built so scored exactly alike."""
    return optim.averaging(lambda n: 1 / (1 + share * n))


class Averages:
    """Tail averages over other shares of the run's steps (tail_average; 0: the raw weights) beside the
    run's own EMA, built with it and fed at every step it is: optim.build_ema is wrapped for the sweep's
    process. The run's training and its own scores are unchanged (an average is only read)."""

    def __init__(self, shares: list[float]):
        self.shares, self.models = shares, {}
        self.build_ema = optim.build_ema

    def __enter__(self) -> Averages:
        if self.shares:  # without shares, the run's own EMA stays as imgcls builds it
            optim.build_ema = self.build
        return self

    def __exit__(self, *exc) -> None:
        optim.build_ema = self.build_ema

    def build(self, model, decay: float):
        ema = self.build_ema(model, decay)
        if ema is None:
            raise SystemExit("--ema-shares needs the run's own EMA (ema=auto or a decay, not 0)")
        extra = {s: torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=tail_average(s), use_buffers=True)
                 for s in self.shares if s}
        self.models = {**extra, **({0.0: model} if 0 in self.shares else {})}  # the run's own: its last weights
        update = ema.update_parameters

        def update_all(source) -> None:
            update(source)
            for average in extra.values():
                average.update_parameters(source)

        ema.update_parameters = update_all  # the one call per step (trainer.train_step)
        return ema

    def score(self, run_dir: Path, data_root: Path) -> dict[float, float]:
        """Held-out accuracy of each average (and the raw weights) after the run, on the run's own view. The
        run's own EMA is scored from its last.safetensors: finish() has loaded the best epoch's weights into
        it by now."""
        from imgcls import hardware, inference

        cfg = config.resolve(file=run_dir / "config.yaml")
        hw = hardware.resolve(cfg.run)
        prep = data.prepare(data_root, cfg, progress=False)
        view = dict(size=config.eval_size(cfg.data), crop=cfg.data.eval_crop, hw=hw, batch_size=cfg.run.eval_batch_size)
        models = {**self.models, optim.EMA_SHARE: inference.load_run(run_dir, weights="last", hw=hw).model}
        out = {s: inference.evaluate(getattr(m, "module", m), prep.images, prep.rows["val"], prep.labels, **view)[1]
               for s, m in sorted(models.items())}
        self.models = {}
        return out


def sem(values: np.ndarray) -> float:
    """Standard error of the mean (nan for one value)."""
    return values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def summary(table: list[tuple[str, str, list[dict]]], crops: list[float]) -> list[str]:
    """The sweep's table: per arm its mean +- s.e. over the seeds, and every later arm's paired difference
    against the first arm over the seeds both ran (same seed: same split, same initial weights)."""
    first, _, first_runs = table[0] if table else ("", "", [])
    base = {r["seed"]: r["final"] for r in first_runs}
    lines = [f"{'arm':24s} {'final acc':>16s} {'best acc':>8s} {'wall s':>7s} {'paired vs ' + first:>24s}  settings"]
    for name, settings, runs in table:
        final = np.array([r["final"] for r in runs])
        paired = np.array([r["final"] - base[r["seed"]] for r in runs if r["seed"] in base])
        against = f"{paired.mean():+.4f} +- {sem(paired):.4f}" if name != first and len(paired) else ""
        lines.append(f"{name:24s} {final.mean():.4f} +- {sem(final):.4f} {np.mean([r['best'] for r in runs]):8.4f} "
                     f"{np.mean([r['wall'] for r in runs]):7.0f} {against:>24s}  {settings}")
        for f in crops:
            acc = np.array([r["at_crop"][f] for r in runs if f in r.get("at_crop", {})])
            if len(acc):
                lines.append(f"{f'  eval_crop={f}':24s} {acc.mean():.4f} +- {sem(acc):.4f}")
        averaged = [r for r in runs if r.get("at_ema")]  # the runs that kept other averages (--ema-shares)
        for share in sorted(averaged[0]["at_ema"] if averaged else {}):
            acc = np.array([r["at_ema"][share] for r in averaged])
            diff = acc - np.array([r["at_ema"][optim.EMA_SHARE] for r in averaged])
            lines.append(f"{f'  ema share {share}':24s} {acc.mean():.4f} +- {sem(acc):.4f} "
                         f"paired {diff.mean():+.4f} +- {sem(diff):.4f} ({len(averaged)} runs)")
    return lines


def saved_table(files: list[Path]) -> list[tuple[str, str, list[dict]]]:
    """Rows from sweeps' --json files as summary's table: one entry per arm and budget (named ARM@EPOCHS where
    an arm ran at several), in the order first seen."""
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    for r in rows:  # JSON keys are strings
        for key in ("at_crop", "at_ema", "at_size"):
            r[key] = {float(k): v for k, v in r.get(key, {}).items()}
    budgets = {}
    for r in rows:
        budgets.setdefault(r["arm"], set()).add(r["epochs"])
    table: dict[str, tuple[str, str, list[dict]]] = {}
    for r in rows:
        name = r["arm"] if len(budgets[r["arm"]]) == 1 else f"{r['arm']}@{r['epochs']}"
        table.setdefault(name, (name, r["settings"], []))[2].append(r)
    return list(table.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path)
    p.add_argument("--epochs", type=int)
    p.add_argument("--seeds", default="0")
    p.add_argument("--base", default="", help="key=value settings shared by every arm")
    p.add_argument("--config", help="a YAML file under --base")
    p.add_argument("--arm", nargs=2, action="append", metavar=("NAME", "SETTINGS"))
    p.add_argument("--classes", type=int, default=0, help="train on the first N classes only")
    p.add_argument("--held-out", type=float, default=0.2)
    p.add_argument("--eval-sizes", default="", help="comma-separated test resolutions to score the final weights at")
    p.add_argument("--eval-crops", default="", help="comma-separated eval_crop fractions to score the final weights at")
    p.add_argument("--ema-shares", default="", help="comma-separated shares of the steps to also average over "
                   "and score (0: the raw weights)")
    p.add_argument("--json", type=Path, help="append one JSON line per run")
    p.add_argument("--table", type=Path, nargs="+", metavar="JSONL", help="train nothing: the table of runs that "
                   "earlier sweeps' --json files hold (the first file's first arm is the one others pair against)")
    args = p.parse_args(argv)
    if args.table:
        table = saved_table(args.table)
        print("\n".join(summary(table, sorted({f for _, _, runs in table for r in runs for f in r.get("at_crop", {})}))))
        return 0
    if not (args.data and args.epochs and args.arm):
        p.error("--data, --epochs and at least one --arm are needed (or --table to read earlier runs)")
    process.keep_freed_memory()
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(s) for s in args.eval_sizes.split(",") if s]
    crops = [float(f) for f in args.eval_crops.split(",") if f]
    averages = Averages([float(f) for f in args.ema_shares.split(",") if f])
    work = Path(tempfile.mkdtemp(prefix="imgcls-sweep-", dir="/tmp"))
    os.environ.setdefault("IMGCLS_CACHE", str(Path(tempfile.gettempdir()) / "imgcls-sweep-cache"))
    base = parse_settings(args.base)
    if args.classes:
        base.setdefault("val_fraction", "0")  # the view's val/ is the held-out split
    table, stopped = [], ""
    try:  # the view and the runs go with `work`, whatever stops the sweep
        root = subset_view(args.data, work, classes=args.classes, held_out=args.held_out) if args.classes else args.data
        print(f"{time.strftime('%Y-%m-%d %H:%M')} {args.data} ({root}), {args.epochs} epochs, seeds {seeds}, "
              f"base {args.config or ''} {args.base}", flush=True)
        for name, settings in args.arm:
            runs = []
            for seed in seeds:
                out = work / f"{name}-{seed}"
                t0 = time.time()
                with averages:
                    result = imgcls.train(root, out, config=args.config, verbose=False,
                                          **{**base, **parse_settings(settings), "epochs": args.epochs, "seed": seed,
                                             "progress": False})
                wall = time.time() - t0
                if result.stopped != "done":  # a signal (or a time limit) cut it short: not a result
                    stopped = result.stopped
                    print(f"  {name} seed {seed}: stopped ({stopped}) after {result.epochs_done} of "
                          f"{args.epochs} epochs: not recorded; the sweep ends here", flush=True)
                    break
                row = {"arm": name, "settings": settings, "seed": seed, "epochs": args.epochs,
                       "final": result.final_val_acc, "best": result.best_val_acc, "wall": wall,
                       "train_seconds": sum(m["seconds"] for m in result.metrics),
                       "curve": [m["val_acc"] for m in result.metrics], "base": args.base, "data": str(args.data),
                       "model": result.config.model.model}
                if sizes:
                    row["at_size"] = score_at_sizes(out, root, sizes)
                if crops:
                    row["at_crop"] = score_eval_crops(out, root, crops)
                if averages.shares:
                    row["at_ema"] = averages.score(out, root)
                runs.append(row)
                print(f"  {name} seed {seed}: final {row['final']:.4f} best {row['best']:.4f} {wall:.0f}s "
                      f"{row.get('at_size', '')} {row.get('at_crop', '')} {row.get('at_ema', '')}", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
                shutil.rmtree(out, ignore_errors=True)
            if runs:
                table.append((name, settings, runs))
            if stopped:
                break
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + "\n".join(summary(table, crops)))
    return 130 if stopped == "interrupted" else 1 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
