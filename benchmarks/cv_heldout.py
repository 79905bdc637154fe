"""Held-out accuracy for cv, fold ensembles and TTA on food-10, whose test labels are not given.

`make` builds a copy-free view of food-10 under /tmp (symlinks only): all of training/, a
stratified half of validation/ as validation/, and the other half renamed 0001.jpg ... as test/,
with its labels in a CSV beside (not inside) the view. `score` compares submissions with them.

    python benchmarks/cv_heldout.py make /work/data/food-10 /tmp/food10-heldout
    flock /tmp/imgcls-cpu.lock imgcls cv /tmp/food10-heldout --folds 5 --out /tmp/cv-food10 key=value ...
    python benchmarks/cv_heldout.py score /tmp/food10-heldout /tmp/cv-food10/submission.csv /tmp/cv-food10/fold-*/submission.csv
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np


def labels_file(view: Path) -> Path:
    return view.parent / f"{view.name}-test-labels.csv"


def make(source: Path, view: Path, *, fraction: float = 0.5, seed: int = 0) -> None:
    if view.exists():
        sys.exit(f"{view} exists; remove it first (it holds only symlinks).")
    val = sorted((source / "validation").glob("*.jpg"))
    labels = np.array([int(re.match(r"(\d+)_", p.name).group(1)) for p in val])
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(val), dtype=bool)
    for c in np.unique(labels):  # stratified: the same share of every class is held out
        pos = rng.permutation(np.flatnonzero(labels == c))
        test_mask[pos[:round(len(pos) * fraction)]] = True
    for folder in ("training", "validation", "test"):
        (view / folder).mkdir(parents=True)
    for p in sorted((source / "training").glob("*.jpg")):
        (view / "training" / p.name).symlink_to(p.resolve())
    rows = []
    for k, i in enumerate(np.flatnonzero(test_mask)):
        name = f"{k + 1:04d}"
        (view / "test" / f"{name}.jpg").symlink_to(val[i].resolve())
        rows.append((name, int(labels[i])))
    for i in np.flatnonzero(~test_mask):
        (view / "validation" / val[i].name).symlink_to(val[i].resolve())
    if (source / "classes.txt").is_file():
        (view / "classes.txt").symlink_to((source / "classes.txt").resolve())
    with open(labels_file(view), "w", newline="") as f:
        csv.writer(f).writerows([("Id", "Category"), *rows])
    print(f"{view}: {len(list((view / 'training').iterdir()))} training, {(~test_mask).sum()} validation, "
          f"{test_mask.sum()} held-out test images; labels in {labels_file(view)}")


def score(view: Path, submissions: list[Path]) -> None:
    with open(labels_file(view), newline="") as f:
        truth = {r["Id"]: int(r["Category"]) for r in csv.DictReader(f)}
    for path in submissions:
        with open(path, newline="") as f:
            preds = {r["Id"]: int(r["Category"]) for r in csv.DictReader(f)}
        assert preds.keys() == truth.keys(), f"{path} does not cover the held-out ids"
        acc = np.mean([preds[i] == y for i, y in truth.items()])
        print(f"{acc:.4f}  {path}  ({len(truth)} held-out images)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("source", type=Path)
    m.add_argument("view", type=Path)
    s = sub.add_parser("score")
    s.add_argument("view", type=Path)
    s.add_argument("submissions", type=Path, nargs="+")
    args = p.parse_args()
    if args.cmd == "make":
        make(args.source, args.view)
    else:
        score(args.view, args.submissions)


if __name__ == "__main__":
    main()
