"""`imgcls check`'s estimate next to the real thing (issue 18): for each preset, the check's wall time
(a fresh process: imports included) and its estimated epoch time, then a short real run with the same
settings (`imgcls train ... epochs=1`) and its epoch's `seconds` from metrics.jsonl (steps + validation,
what the estimate predicts). `subset=` keeps the real runs short; the check estimates that same run.

    flock -x /tmp/imgcls.lock python benchmarks/check_estimate.py --data /work/data/tiny-imagenet-100 \
        --configs imgcls/presets/tiny-imagenet*.yaml --set subset=0.1 [--skip-train]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECK = """
import json, sys, imgcls
from imgcls.process import keep_freed_memory
keep_freed_memory()  # as the command line does, and the real run below
r = imgcls.check(sys.argv[1], config=sys.argv[2], verbose=False, progress=False,
                 **dict(kv.split("=", 1) for kv in sys.argv[3:]))
e = r.estimate
print(json.dumps({"epoch_seconds": e.epoch_seconds, "images_per_second": e.images_per_second,
                  "steps_per_epoch": e.steps_per_epoch, "peak_memory": e.peak_memory, "device": e.device,
                  "stages": {s.name: round(s.seconds, 2) for s in r.stages}}))
"""


def check(data: str, cfg: str, settings: list[str]) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHECK, data, cfg, *settings], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall": time.perf_counter() - t0}


def train(data: str, cfg: str, settings: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "imgcls", "train", data, "--out", tmp, "--config", cfg, *settings,
                        "epochs=1", "progress=false"], check=True, capture_output=True)
        m = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[0])
        return {"epoch_seconds": m["seconds"], "images_per_second": m["images_per_second"],
                "wall": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="settings for both, e.g. subset=0.1")
    p.add_argument("--skip-train", action="store_true", help="only the checks (their wall time and estimate)")
    args = p.parse_args()
    print("| config | check wall s | estimated epoch s | est. img/s | real epoch s | real img/s | est / real |")
    print("|---|---|---|---|---|---|---|")
    for cfg in args.configs:
        c = check(args.data, cfg, args.set)
        r = train(args.data, cfg, args.set) if not args.skip_train else None
        real = (f"{r['epoch_seconds']:.1f} | {r['images_per_second']:.1f} | {c['epoch_seconds'] / r['epoch_seconds']:.2f}"
                if r else "- | - | -")
        print(f"| {cfg} | {c['wall']:.1f} | {c['epoch_seconds']:.1f} | {c['images_per_second']:.1f} | {real} |",
              flush=True)
        print(f"  check stages {c['stages']}, peak memory {c['peak_memory'] / 1e9:.2f} GB, {c['device']}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
