"""epochs=auto against epoch counts picked by hand, all under the same time_limit (issue 16).

    flock -x /tmp/imgcls.lock python benchmarks/time_budget.py --data /work/data/food-10 --limit 240 \\
        --fixed 4,6,9 --seeds 0,1 model=resnet18d width=32 image_size=96

Each run is `imgcls train DATA --out RUN time_limit=T seed=S [settings]` as a subprocess (wall from
the command's start, imports and the report included), on a cache built before the timing:
`epochs=auto`, then each `epochs=N` of --fixed (a run that does not fit is stopped by the limit,
its schedule cut). Prints per run: wall and the margin left of T, epochs trained of planned, the
last learning rate as a share of the peak, held-out accuracy (validation split).
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

REPO = Path(__file__).resolve().parents[1]


def run(data: Path, out: Path, settings: list[str], cache: Path) -> dict:
    env = {**os.environ, "IMGCLS_CACHE": str(cache)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "imgcls", "train", str(data), "--out", str(out), "progress=false",
                           *settings], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    from imgcls import config

    cfg = config.resolve(file=out / "config.yaml")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = cfg.optim.lr * cfg.run.batch_size / 512
    return {"wall": wall, "epochs": len(metrics), "planned": cfg.run.epochs, "acc": metrics[-1]["val_acc"],
            "best": max(m["val_acc"] for m in metrics), "last_lr_share": metrics[-1]["lr"] / peak,
            "stopped": "stopped" in proc.stdout}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--limit", type=int, required=True, help="time_limit= in seconds")
    p.add_argument("--fixed", default="4,6,9", help="epoch counts picked by hand")
    p.add_argument("--seeds", default="0")
    p.add_argument("settings", nargs="*", help="key=value for every run")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="imgcls-time-budget-"))
    cache = work / "cache"
    subprocess.run([sys.executable, "-m", "imgcls", "inspect", str(args.data), "progress=false", *args.settings],
                   cwd=REPO, env={**os.environ, "IMGCLS_CACHE": str(cache)}, capture_output=True)
    arms = ["epochs=auto", *[f"epochs={e}" for e in args.fixed.split(",")]]
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {args.data}, time_limit={args.limit}s, settings {' '.join(args.settings)}")
    rows = {}
    for arm in arms:
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = work / f"{arm.replace('=', '-')}-s{seed}"
            r = run(args.data, out, [*args.settings, arm, f"time_limit={args.limit}s", f"seed={seed}"], cache)
            rows.setdefault(arm, []).append(r)
            print(f"  {arm:12s} seed {seed}: wall {r['wall']:.0f}s (margin {args.limit - r['wall']:+.0f}s), "
                  f"{r['epochs']} of {r['planned']} epochs{' (stopped by the limit)' if r['stopped'] else ''}, last lr "
                  f"{100 * r['last_lr_share']:.2f}% of peak, held-out acc {r['acc']:.4f}", flush=True)
    print(f"\n{'arm':12s} {'acc (mean +- s.e.)':>20s} {'wall s':>7s} {'margin s':>9s} {'epochs':>7s} {'last lr %':>9s}")
    for arm, rs in rows.items():
        acc = np.array([r["acc"] for r in rs])
        se = acc.std(ddof=1) / math.sqrt(len(acc)) if len(acc) > 1 else float("nan")
        print(f"{arm:12s} {acc.mean():.4f} +- {se:.4f}  {np.mean([r['wall'] for r in rs]):7.0f} "
              f"{args.limit - np.mean([r['wall'] for r in rs]):9.0f} {np.mean([r['epochs'] for r in rs]):7.1f} "
              f"{100 * np.mean([r['last_lr_share'] for r in rs]):9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
