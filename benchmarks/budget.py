"""The recipe at a fixed epoch budget (issue 15): held-out accuracy, mean +- s.e. over seeds, and wall
time, for imgcls's defaults against the recipe before issue 15, against timm's train.py pipeline
with timm's own recipe and against fastai's Imagenette leaderboard recipe (issue 35), in one
invocation, with the ratios.

    flock -x /tmp/imgcls.lock python benchmarks/budget.py food10 --epochs 5,20 --seeds 0,1,2
    flock -x /tmp/imgcls.lock python benchmarks/budget.py tiny20 --epochs 10,30 --seeds 0,1,2
    flock -x /tmp/imgcls.lock python benchmarks/budget.py food10 --rows imgcls,fastai,fastai18 --epochs 5,20

Tasks: `food10` = food-10 at 128 px, training/ -> validation/ (1,000 images); `tiny20` = the first 20
classes of tiny-imagenet-100 at 64 px, a stratified 20% of their 10,000 labelled images held out.
Rows:
  imgcls    `imgcls train DATA --out RUN epochs=E seed=S` (no other flag: the defaults).
  baseline  the recipe before issue 15, at --baseline-rev (a git worktree of it under /tmp, which still has configs/), with a sane
            model: `--config configs/food11.yaml model=timm:resnet18` (resp. tiny-imagenet.yaml).
  timm      timm's train.py pipeline (benchmarks/time_to_accuracy.py: workers decode and augment every
            image every epoch) training the imgcls default model with timm's train.py recipe
            (--timm-recipe defaults: SGD-Nesterov, --lr-base 0.1 per 256, wd 2e-5, cosine, smoothing 0.1,
            colour jitter 0.4, scale 0.08-1; or a3: "ResNet strikes back" A3, LAMB + BCE + mixup/cutmix
            + RandAugment), its 5 warmup epochs capped at 5% of the run.
  fastai    fastai's Imagenette leaderboard recipe with fastai's own data pipeline (benchmarks/fastai_imagenette.py:
            xresnet50 + Mish + self-attention, ranger lr 8e-3 at batch 64, fit_flat_cos, label smoothing, crops of
            35-100% + flip, at the task's size), run by --fastai-python, the python of a virtual environment of its
            own (benchmarks/fastai-requirements.txt: fastai is no imgcls dependency); channels_last, fp32 on the CPU.
  fastai18  the same with xresnet18, the size of imgcls's default model.
imgcls rows run as `python -m imgcls` subprocesses, each on a cache built before its timing (the
decoding is a one-off the later runs of a session reuse); wall = the subprocess's, imports and
report included. fastai rows are subprocesses timed the same way, their files read once before (into
the page cache). `--auto F` adds an `epochs=auto time_limit=` run at F x the baseline's wall at the
largest epoch budget (the "same accuracy in a third of the time" check). `--row-epochs timm=5` runs a
row at fewer budgets than --epochs (e.g. short imgcls schedules against timm's 5 epochs only), and
`--row-seeds baseline=0` a row at its own seeds (a long baseline once, the imgcls rows at three).

Time to another row's accuracy is read two ways: whole imgcls schedules (the shortest `epochs=E` run
whose mean accuracy reaches it: what a user who wants that accuracy would run) and, along each imgcls
run, the first epoch-end evaluation that reaches it (mid-schedule, before the decay: pessimistic). Each row
other than imgcls and baseline is also set against imgcls at the same budget (points, wall ratio).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

TASKS = {
    "food10": {"data": "/work/data/food-10", "config": "configs/food11.yaml", "size": 128},
    "tiny20": {"data": "/work/data/tiny-imagenet-100", "config": "configs/tiny-imagenet.yaml", "size": 64,
               "classes": 20},
}


FASTAI = {"fastai": "xresnet50", "fastai18": "xresnet18"}  # row -> --arch of benchmarks/fastai_imagenette.py
ROWS = ("imgcls", "baseline", "timm", *FASTAI)


def view_of(task: dict, work: Path, seed: int = 0) -> Path:
    """The task's data as an imagefolder of symlinks (train/<class>/, val/<class>/): the layout both
    imgcls and timm's ImageDataset read, with the task's held-out split."""
    from time_to_accuracy import choose, labelled, make_view

    from imgcls import data, layouts

    root = Path(task["data"])
    view = work / f"view-{root.name}"
    if view.is_dir():
        return view
    if "classes" in task:
        paths, labels, names = labelled(root)
        chosen = choose(labels, classes=task["classes"], per_class=10**9)
        _, held = data.stratified_split(labels[chosen], 0.2, seed=seed)
        make_view(view, [paths[i] for i in chosen], labels[chosen], names, held)
    else:  # the dataset's own split: train -> train/, val -> val/
        ds = layouts.read(root)
        samples = ds.splits["train"] + ds.splits["val"]
        held = np.arange(len(ds.splits["train"]), len(samples))
        make_view(view, [s.path for s in samples], np.array([s.label for s in samples]), ds.classes, held)
    return view


def baseline_tree(rev: str) -> Path:
    tree = Path(tempfile.gettempdir()) / f"imgcls-baseline-{rev}"
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), rev], cwd=REPO, check=True,
                       capture_output=True)
    return tree


def run_imgcls(tree: Path, view: Path, out: Path, settings: list[str], cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "IMGCLS_CACHE": str(cache)}
    argv = [sys.executable, "-m", "imgcls", "train", str(view), "--out", str(out), "progress=false", *settings]
    t0 = time.time()
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = np.cumsum([m["seconds"] for m in metrics]) + (wall - sum(m["seconds"] for m in metrics))
    return {"acc": metrics[-1]["val_acc"], "wall": wall, "curve": [m["val_acc"] for m in metrics],
            "elapsed": elapsed.tolist(),  # wall from the command's start to each epoch's end (imports at the first)
            "epochs": len(metrics), "train_seconds": sum(m["seconds"] for m in metrics)}


def warm_cache(tree: Path, view: Path, settings: list[str], cache: Path) -> None:
    """Decode the cache a row will read, outside its timing."""
    env = {**os.environ, "PYTHONPATH": str(tree), "IMGCLS_CACHE": str(cache)}
    subprocess.run([sys.executable, "-m", "imgcls", "inspect", str(view), "progress=false", *settings],
                   cwd=tree, env=env, capture_output=True, text=True)


def timm_recipe(name: str, *, epochs: int, batch: int):
    from time_to_accuracy import TimmRecipe

    warmup = min(5.0, 0.05 * epochs)  # train.py's 5 warmup epochs, capped for a short run
    if name == "defaults":
        return TimmRecipe(opt="sgd", lr=0.1 * batch / 256, weight_decay=2e-5, warmup_epochs=warmup, smoothing=0.1,
                          color_jitter=0.4, scale=(0.08, 1.0))
    # A3 (Wightman et al. 2021): LAMB 8e-3 at batch 2048 (timm scales adaptive optimizers by sqrt), wd 0.02,
    # BCE, mixup 0.1 + cutmix 1.0, RandAugment m6.
    return TimmRecipe(opt="lamb", lr=8e-3 * math.sqrt(batch / 2048), weight_decay=0.02, warmup_epochs=warmup,
                      smoothing=0.0, bce=True, mixup=0.1, cutmix=1.0, auto_augment="rand-m6-mstd0.5-inc1",
                      scale=(0.08, 1.0))


def run_timm_row(view: Path, work: Path, *, model: str, size: int, epochs: int, batch: int, seed: int,
                 recipe: str) -> dict:
    from time_to_accuracy import Recipe, run_timm

    from imgcls import hardware

    amp = hardware.native_bf16()
    r = Recipe(model=model, width=0, size=size, epochs=epochs, batch=batch, lr=0.0, weight_decay=0.0, momentum=0.9,
               warmup_epochs=0.0, smoothing=0.1, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5,
               seed=seed, device="cpu", amp=amp, timm_amp=amp, channels_last=True, timm_channels_last=True,
               eval_batch=256)
    o = run_timm(view, r, work, workers=os.cpu_count() or 1, t=timm_recipe(recipe, epochs=epochs, batch=batch))
    return {"acc": o.accuracy, "wall": o.wall, "curve": o.curve, "epochs": epochs, "train_seconds": o.wall - o.prepare}


def run_fastai(python: str, view: Path, out: Path, *, arch: str, size: int, epochs: int, seed: int) -> dict:
    """fastai's leaderboard recipe in the fastai venv's python; its other settings are the script's defaults.
    channels_last: 6% less time per xresnet18 step here (2.4 s against 2.55 s at batch 64, 128 px, one
    thread), and the timm row runs channels_last too; fastai's mixed precision is CUDA-only, so fp32."""
    argv = [python, str(HERE / "fastai_imagenette.py"), "--data", str(view), "--out", str(out), "--arch", arch,
            "--size", str(size), "--epochs", str(epochs), "--seed", str(seed), "--threads", str(os.cpu_count() or 1),
            "--channels-last"]
    t0 = time.time()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    res = json.loads((out / "result.json").read_text())
    return {"acc": res["accuracy"], "wall": wall, "curve": res["curve"], "epochs": epochs,
            "train_seconds": res["wall"] - res["prepare_seconds"], "versions": res["versions"]}


def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")


def per_row(p: argparse.ArgumentParser, flag: str, text: str, rows: list[str], default: list[int], *,
            allowed: list[int] | None = None) -> dict[str, list[int]]:
    """"ROW=1,2;ROW=3" -> {row: [ints]} for every row of --rows, `default` where a row is not named."""
    out = {row: default for row in rows}
    for item in filter(None, text.split(";")):
        row, _, listed = item.partition("=")
        out[row] = [int(v) for v in listed.split(",")]
        if row not in rows or (allowed is not None and not set(out[row]) <= set(allowed)):
            p.error(f"{flag} {item!r}: name a row of --rows" + (" and epochs of --epochs" if allowed else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--epochs", default="5,20")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--timm-seeds", help="seeds of the timm row (default --seeds): its PIL pipeline is the slowest row")
    p.add_argument("--row-seeds", default="", help="ROW=S1,S2;ROW=...: a row's own seeds (e.g. baseline=0 for a long baseline)")
    p.add_argument("--rows", default="imgcls,baseline,timm", help=f"some of {','.join(ROWS)}")
    p.add_argument("--row-epochs", default="", help="ROW=E1,E2;ROW=...: a row's own subset of --epochs")
    p.add_argument("--baseline-rev", default="4f2b1ad", help="the commit before issue 15")
    p.add_argument("--timm-recipe", choices=["defaults", "a3"], default="defaults")
    p.add_argument("--fastai-python", default="/work/venvs/fastai/bin/python",
                   help="python of the fastai virtual environment (benchmarks/fastai-requirements.txt)")
    p.add_argument("--auto", type=float, default=0.0, help="also epochs=auto at this fraction of the baseline's wall")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgcls-budget")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from imgcls import config, process

    process.keep_freed_memory()
    task, epochs_list = TASKS[args.task], [int(e) for e in args.epochs.split(",")]
    seeds, rows = [int(s) for s in args.seeds.split(",")], args.rows.split(",")
    if not set(rows) <= set(ROWS):
        p.error(f"--rows {args.rows!r}: each row one of {','.join(ROWS)}")
    if set(rows) & set(FASTAI) and not Path(args.fastai_python).is_file():
        p.error(f"--fastai-python {args.fastai_python}: no such file (benchmarks/fastai-requirements.txt makes it)")
    row_epochs = per_row(p, "--row-epochs", args.row_epochs, rows, epochs_list, allowed=epochs_list)
    row_seeds = per_row(p, "--row-seeds", args.row_seeds + (f";timm={args.timm_seeds}" if args.timm_seeds and "timm" in rows else ""),
                        rows, seeds)
    args.work.mkdir(parents=True, exist_ok=True)
    view = view_of(task, args.work)  # timm's input; imgcls reads the dataset itself where it is whole
    data = view if "classes" in task else Path(task["data"])
    new = config.resolve(defaults={"image_size": task["size"]})
    base_settings = ["--config", task["config"], "model=timm:resnet18", "val_fraction=0"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {args.task}: {view} ({task['size']} px), commit {commit}, baseline "
          f"{args.baseline_rev}, seeds {seeds}, imgcls default model {new.model.model} batch {new.run.batch_size}, "
          f"timm recipe {args.timm_recipe}", flush=True)
    trees = {"imgcls": REPO, "baseline": baseline_tree(args.baseline_rev) if "baseline" in rows else None}
    settings = {"imgcls": [], "baseline": base_settings}
    for row in ("imgcls", "baseline"):
        if row in rows:
            warm_cache(trees[row], data, settings[row], args.work / f"cache-{row}")
    if set(rows) & set(FASTAI):
        from time_to_accuracy import read_all

        read_all(view)  # fastai decodes the files every epoch: from the page cache, as timm's row does
    results: dict[tuple[str, int], list[dict]] = {}
    for epochs in epochs_list:
        for row in [r for r in rows if epochs in row_epochs[r]]:
            for seed in row_seeds[row]:
                out = args.work / f"{row}-e{epochs}-s{seed}"
                subprocess.run(["rm", "-rf", str(out)])
                if row == "timm":
                    r = run_timm_row(view, args.work, model=new.model.model, size=task["size"], epochs=epochs,
                                     batch=new.run.batch_size, seed=seed, recipe=args.timm_recipe)
                elif row in FASTAI:
                    r = run_fastai(args.fastai_python, view, out, arch=FASTAI[row], size=task["size"], epochs=epochs,
                                   seed=seed)
                else:
                    r = run_imgcls(trees[row], data, out, [*settings[row], f"epochs={epochs}", f"seed={seed}"],
                                   args.work / f"cache-{row}")
                results.setdefault((row, epochs), []).append({**r, "seed": seed})
                print(f"  {row:8s} {epochs:3d} epochs seed {seed}: acc {r['acc']:.4f} wall {r['wall']:.0f}s", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({"task": args.task, "row": row, "epochs": epochs, **r, "seed": seed,
                                            "commit": commit}) + "\n")
    if args.auto and "baseline" in rows:
        top = max(row_epochs["baseline"])
        limit = args.auto * np.mean([r["wall"] for r in results[("baseline", top)]])
        for seed in seeds:
            out = args.work / f"auto-s{seed}"
            subprocess.run(["rm", "-rf", str(out)])
            r = run_imgcls(REPO, data, out, ["epochs=auto", f"time_limit={int(limit)}s", f"seed={seed}"],
                           args.work / "cache-imgcls")
            results.setdefault(("auto", 0), []).append({**r, "seed": seed})
            print(f"  auto (time_limit={int(limit)}s) seed {seed}: {r['epochs']} epochs, acc {r['acc']:.4f} "
                  f"wall {r['wall']:.0f}s", flush=True)
    report(results, epochs_list, rows)
    return 0


def report(results: dict, epochs_list: list[int], rows: list[str]) -> None:
    acc_wall = {key: (mean_se([r["acc"] for r in runs]), float(np.mean([r["wall"] for r in runs])))
                for key, runs in results.items()}  # (row, epochs) -> ((mean acc, s.e.), mean wall)
    print(f"\n{'row':10s} {'epochs':>6s} {'held-out acc':>18s} {'wall s':>8s}   vs baseline; vs imgcls")
    for epochs in epochs_list:
        refs = {"baseline": acc_wall.get(("baseline", epochs)), "imgcls": acc_wall.get(("imgcls", epochs))}
        for row in [r for r in rows if (r, epochs) in results]:
            (acc, se), wall = acc_wall[(row, epochs)]
            vs = [("vs imgcls " if ref == "imgcls" else "") + f"{100 * (acc - got[0][0]):+.1f} points, wall x"
                  f"{wall / got[1]:.2f}" for ref, got in refs.items() if got and row not in ("baseline", ref)]
            print(f"{row:10s} {epochs:6d} {acc:.4f} +- {se:.4f} {wall:8.0f}   {'; '.join(vs)}")
    mine = sorted(e for r, e in results if r == "imgcls")
    curves = {e: (np.mean([r["curve"] for r in results[("imgcls", e)]], axis=0),
                  np.mean([r["elapsed"] for r in results[("imgcls", e)]], axis=0)) for e in mine}
    for other in ("baseline", "timm", *FASTAI):  # time to the other row's accuracy at each of its budgets
        for epochs in sorted(e for r, e in results if r == other):
            ((target, _), o_wall) = acc_wall[(other, epochs)]
            whole = next((e for e in mine if acc_wall[("imgcls", e)][0][0] >= target), None)
            print(f"time to {other}'s {epochs}-epoch accuracy {target:.4f} ({o_wall:.0f} s): " + (
                f"whole imgcls schedule epochs={whole}, {acc_wall[('imgcls', whole)][1]:.0f} s = "
                f"{o_wall / acc_wall[('imgcls', whole)][1]:.1f}x less wall" if whole else "no imgcls schedule reaches it"))
            for e, (curve, elapsed) in curves.items():
                if (curve >= target).any():
                    hit = int(np.argmax(curve >= target))
                    print(f"    along imgcls's {e}-epoch runs: after epoch {hit + 1}, {elapsed[hit]:.0f} s = "
                          f"{o_wall / elapsed[hit]:.1f}x less wall")
    if ("auto", 0) in results:
        runs = results[("auto", 0)]
        acc, se = mean_se([r["acc"] for r in runs])
        print(f"{'auto':10s} {np.mean([r['epochs'] for r in runs]):6.1f} {acc:.4f} +- {se:.4f} "
              f"{np.mean([r['wall'] for r in runs]):8.0f}   epochs=auto within the time limit")


if __name__ == "__main__":
    sys.exit(main())
