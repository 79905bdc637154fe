"""A final fit on every labelled image, and ensemble weights fitted out of fold, scored on images none
of the runs saw (issue 16). Uses benchmarks/cv_heldout.py's view of food-10: all of training/, half of
validation/ as validation, the other half as a test split whose labels stay outside the view.

    flock -x /tmp/imgcls.lock python benchmarks/final_fit.py --source /work/data/food-10 --epochs 8 --folds 3 \\
        model=resnet18d width=32 image_size=96

Runs (subprocesses of `imgcls`, the same settings for all but what is named):
  holdout=val   train on training/, keep the best epoch on validation/
  holdout=none  train on training/ + validation/ for the same epochs, keep the last weights
  cv A          --folds K over training/ + validation/, seed 0, --refit (folds' mean and the refit)
  cv B          the same with seed 1 and width= halved (a weaker, different member)
  predict A B   equal weights against --weights oof
Prints each submission's accuracy on the hidden labels.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def imgcls(*argv: str, env: dict) -> str:
    """`imgcls ARGV` in a subprocess; its output (progress bars off: train and cv take progress=false)."""
    quiet = ["progress=false"] if argv[0] in ("train", "cv") else []
    proc = subprocess.run([sys.executable, "-m", "imgcls", *argv, *quiet], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"imgcls {' '.join(argv)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    import csv

    from cv_heldout import labels_file, make

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=Path("/work/data/food-10"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("settings", nargs="*")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="imgcls-final-fit-"))
    view = work / "food10-heldout"
    make(args.source, view)
    env = {**os.environ, "IMGCLS_CACHE": str(work / "cache")}
    common = [*args.settings, f"epochs={args.epochs}"]
    width = next((int(s.split("=")[1]) for s in args.settings if s.startswith("width=")), 64)
    subs = {}
    for name, extra in (("holdout=val", []), ("holdout=none", ["holdout=none"])):
        out = work / name.replace("=", "-")
        imgcls("train", str(view), "--out", str(out), *common, *extra, env=env)
        subs[name] = out / "submission.csv"
    cv_a, cv_b = work / "cv-a", work / "cv-b"
    printed = imgcls("cv", str(view), "--folds", str(args.folds), "--out", str(cv_a), "--refit", "--submit", "folds",
                     *common, env=env)
    print("\n".join(line for line in printed.splitlines() if line.startswith(("cv:", "refit"))))
    subs["cv A: mean of the folds"] = cv_a / "submission.csv"
    subs["cv A: refit on every labelled image"] = cv_a / "refit" / "submission.csv"
    imgcls("cv", str(view), "--folds", str(args.folds), "--out", str(cv_b), *common, "seed=1",
           f"width={max(8, width // 2)}", env=env)
    subs["cv B (seed 1, half width): mean of the folds"] = cv_b / "submission.csv"
    for name, weights in (("equal", []), ("oof", ["--weights", "oof"])):
        out = work / f"ensemble-{name}.csv"
        printed = imgcls("predict", str(cv_a), str(cv_b), "--data", str(view), "--out", str(out), *weights, env=env)
        print("\n".join(line for line in printed.splitlines() if line.startswith(("weights", "  "))))
        subs[f"ensemble A + B, {name} weights"] = out
    with open(labels_file(view), newline="") as f:
        truth = {r["Id"]: int(r["Category"]) for r in csv.DictReader(f)}
    print(f"\naccuracy on the {len(truth)} hidden-label images ({' '.join(common)}):")
    for name, path in subs.items():
        with open(path, newline="") as f:
            preds = {r["Id"]: int(r["Category"]) for r in csv.DictReader(f)}
        acc = sum(preds[i] == y for i, y in truth.items()) / len(truth)
        print(f"  {acc:.4f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
