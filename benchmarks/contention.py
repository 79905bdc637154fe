"""Training speed on a shared machine (issue 35): img/s of the default recipe alone, beside a plain CPU burner
and beside a second training, before (threads fixed at the core count: torch's default, what imgcls ran
with before) and after (threads=auto, the default now: process.ThreadTuner), at 64 and 128 px, in one
invocation.

    flock -x /tmp/imgcls.lock python benchmarks/contention.py
    flock -x /tmp/imgcls.lock python benchmarks/contention.py --sizes 128 --epochs 4 --variants "auto;threads=1"

Each measurement is one `python -m imgcls train DATA --out RUN epochs=E subset=S image_size=PX` process:
img/s = the images of epochs 2.. over their training seconds (metrics.jsonl; the first epoch pays the
kernels' set-up). "beside a training": the same command twice at once, their mean. The caches are built
before any timing. Targets: beside one busy process >= 40% of alone; alone not lower than before.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = {64: "/work/data/tiny-imagenet-100", 128: "/work/data/food-10"}
SUBSET = {64: 20, 128: 60}  # images per class: tiny-imagenet 100 classes x 20, food-10 10 x 60 (5-6 s an epoch alone)
BURNER = "while True: pass"


def train_cmd(data: str, out: Path, size: int, args, variant: list[str]) -> list[str]:
    return [sys.executable, "-m", "imgcls", "train", data, "--out", str(out), f"epochs={args.epochs}",
            f"subset={args.subset or SUBSET[size]}", f"image_size={size}", "progress=false", *variant]


def rate(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return sum(m["train_images"] for m in rows) / sum(m["seconds"] - m["eval_seconds"] for m in rows)


def measure(data: str, size: int, args, variant: list[str], scenario: str, work: Path, env: dict) -> float:
    outs = [work / f"{scenario}-{size}-{time.time_ns()}-{k}" for k in range(2 if scenario == "training" else 1)]
    burner = subprocess.Popen([sys.executable, "-c", BURNER]) if scenario == "burner" else None
    try:
        procs = [subprocess.Popen(train_cmd(data, o, size, args, variant), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for o in outs]
        for p in procs:
            _, err = p.communicate()
            if p.returncode:
                raise SystemExit(f"training failed:\n{err[-2000:]}")
    finally:
        if burner:
            burner.kill()
            burner.wait()
    return sum(rate(o) for o in outs) / len(outs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--subset", type=int, default=0, help="images per class (default: 20 at 64 px, 60 at 128 px)")
    p.add_argument("--variants", default=f"before=threads={os.cpu_count()};after=",
                   help="NAME=key=value ...;NAME=...: the settings of each variant")
    args = p.parse_args()
    variants = {v.split("=", 1)[0]: [kv for kv in v.split("=", 1)[1].split(" ") if kv] for v in args.variants.split(";")}
    scenarios = ("alone", "burner", "training")
    work = Path(tempfile.mkdtemp(prefix="imgcls-contention-"))
    env = {**os.environ, "IMGCLS_CACHE": str(work / "cache")}
    env.pop("OMP_NUM_THREADS", None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"contention.py {time.strftime('%Y-%m-%d %H:%M')} commit {commit}, {os.cpu_count()} cores "
          f"({platform.processor() or platform.machine()}), epochs={args.epochs}", flush=True)
    results: dict[tuple, float] = {}
    for size in map(int, args.sizes.split(",")):
        data = DATA[size]
        subprocess.run(train_cmd(data, work / f"warm-{size}", size, args, ["epochs=1"]), env=env, check=True,
                       capture_output=True)  # the cache, built before any timing
        for scenario in scenarios:
            for name, variant in variants.items():
                results[(size, scenario, name)] = r = measure(data, size, args, variant, scenario, work, env)
                print(f"  {size:4d} px  {scenario:8s}  {name:8s} {' '.join(variant) or '(defaults)':14s} {r:7.1f} img/s",
                      flush=True)
    print(f"\n{'px':>4s} {'variant':8s} {'alone':>8s} {'burner':>8s} {'training':>9s}   beside a burner / alone, "
          "beside a training / alone")
    for size in map(int, args.sizes.split(",")):
        for name in variants:
            a, b, t = (results[(size, s, name)] for s in scenarios)
            print(f"{size:4d} {name:8s} {a:8.1f} {b:8.1f} {t:9.1f}   {b / a:.2f}, {t / a:.2f}")
    names = list(variants)
    if len(names) == 2:
        for size in map(int, args.sizes.split(",")):
            ratios = [results[(size, s, names[1])] / results[(size, s, names[0])] for s in scenarios]
            print(f"{size:4d} px: {names[1]} / {names[0]}: alone x{ratios[0]:.2f}, beside a burner x{ratios[1]:.2f}, "
                  f"beside a training x{ratios[2]:.2f}")


if __name__ == "__main__":
    main()
