"""What `imgcls tune` buys (issue 36): a search within a fixed CPU budget on the training images alone, then the
tuned settings against the defaults at the same epochs, 3 seeds each, scored on held-out images the search
never saw, in one invocation, with what the search cost.

    flock -x /tmp/imgcls.lock python benchmarks/tune_bench.py food10 --search 60m --epochs 5 --seeds 0,1,2
    flock -x /tmp/imgcls.lock python benchmarks/tune_bench.py tiny20 --search 60m --epochs 5 --seeds 0,1,2

Tasks as benchmarks/budget.py's: food10 = food-10 at 128 px, training/ -> validation/; tiny20 = the first 20
classes of tiny-imagenet-100 at 64 px, 20% held out. The search runs `imgcls tune` on a view holding only
the task's training images (its trials hold out 20% of them: val_fraction=0.2, one split for the study),
with `--time-limit` = --search and `--confirm 0`. Then, on the task's own split, `imgcls train --config
TUNE/best.yaml val_fraction=0 split_seed=-1 seed=S` (the tuned settings, trained on all the training
images) against `imgcls train epochs=E seed=S` (the defaults). Prints both rows' held-out accuracy (mean
+- s.e.), wall, the difference, and the search's trials, wall and best settings. Say plainly if the
defaults win: the search's best of N noisy scores is optimistic, and this comparison is not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from budget import TASKS, mean_se, view_of  # noqa: E402


def imgcls(*argv: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "imgcls", *argv], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"imgcls {' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, time.time() - t0


def final_acc(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_acc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--search", default="60m", help="the search's --time-limit")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", type=Path, default=Path("/tmp/imgcls-tune-bench"))
    args = p.parse_args()
    task, seeds = TASKS[args.task], [int(s) for s in args.seeds.split(",")]
    work = args.work / args.task
    subprocess.run(["rm", "-rf", str(work)])
    work.mkdir(parents=True)
    view = view_of(task, work)  # train/ and val/: the task's split
    search = work / "search-data"
    (search / "train").parent.mkdir(parents=True, exist_ok=True)
    (search / "train").symlink_to(view / "train")  # the training images only: the search never sees val/
    env = {**os.environ, "IMGCLS_CACHE": str(work / "cache")}
    size = [f"image_size={task['size']}", "progress=false"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {args.task}: commit {commit}, {os.cpu_count()} cores, search "
          f"{args.search} at {args.epochs} epochs, seeds {seeds}", flush=True)
    tune = work / "tune"
    proc, search_wall = imgcls("tune", str(search), "--out", str(tune), "--time-limit", args.search, "--confirm", "0",
                               f"epochs={args.epochs}", "val_fraction=0.2", *size, env=env)
    print(proc.stdout.strip().splitlines()[0])
    print("\n".join(proc.stdout.strip().splitlines()[-4:]), flush=True)
    rows: dict[str, list[tuple[float, float]]] = {"defaults": [], "tuned": []}
    for seed in seeds:
        for row, extra in (("defaults", []), ("tuned", ["--config", str(tune / "best.yaml"), "val_fraction=0",
                                                         "split_seed=-1"])):
            out = work / f"{row}-s{seed}"
            _, wall = imgcls("train", str(view), "--out", str(out), *extra, f"epochs={args.epochs}", f"seed={seed}",
                             *size, env=env)
            rows[row].append((final_acc(out), wall))
            print(f"  {row:8s} seed {seed}: held-out acc {rows[row][-1][0]:.4f}, {wall:.0f} s", flush=True)
    status = subprocess.run([sys.executable, "-m", "imgcls", "tune", "--status", str(tune)], cwd=REPO, env=env,
                            capture_output=True, text=True).stdout.strip()
    print(f"\n{args.task}, {args.epochs} epochs, seeds {seeds}: held-out acc (the task's split), mean +- s.e., wall")
    for row, values in rows.items():
        (m, se), wall = mean_se([a for a, _ in values]), np.mean([w for _, w in values])
        print(f"  {row:8s} {m:.4f} +- {se:.4f}   {wall:6.0f} s")
    diff = [t - d for (t, _), (d, _) in zip(rows["tuned"], rows["defaults"])]
    m, se = mean_se(diff)
    print(f"  tuned - defaults: {100 * m:+.1f} +- {100 * se:.1f} points (paired by seed); "
          f"{'the tuned settings win' if m - 2 * se > 0 else 'the defaults win' if m + 2 * se < 0 else 'no clear winner'}")
    print(f"search: {search_wall:.0f} s wall; {status}")


if __name__ == "__main__":
    main()
