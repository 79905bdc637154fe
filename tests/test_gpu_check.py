"""benchmarks/gpu_check.py in its CPU mode (`--device cpu --quick`), as CI runs it, so the GPU check
cannot rot: every path runs or says why it is skipped, and every figure is printed."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import torch

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
NUMBER = r"\d+(\.\d+)?"


def test_gpu_check_quick_on_the_cpu(tmp_path):
    # No such folder: the script falls back to scikit-learn's digits, as in a CI without the data.
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    out = proc.stdout
    print(out, f"\n{seconds:.1f}s")
    assert proc.returncode == 0, out + proc.stderr
    lines = out.splitlines()
    assert re.match(r"imgcls gpu_check  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d .*  commit [0-9a-f]{7,}", lines[0])
    assert lines[1].startswith("device: cpu (") and f"torch {torch.__version__}" in lines[2]
    assert "food-11 layout, 10 classes, train 160, val 40, test 20" in out  # the digits, shrunk
    for px in (16, 32):  # one row per model and size, every figure a number
        row = re.search(rf"^tinycnn:8 +{px} +32 +({NUMBER}) +({NUMBER}) +({NUMBER})% +RSS {NUMBER} GiB .* ({NUMBER}) +\d+s$",
                        out, re.M)
        assert row, f"no figures for {px} px"
        train, step, ratio = float(row.group(1)), float(row.group(3)), float(row.group(5))
        assert train > 0 and step > 0  # ratio = train / step, from the unrounded figures printed to 1 img/s and 0.1%
        assert 100 * (train - 0.5) / (step + 0.5) - 0.05 <= ratio <= 100 * (train + 0.5) / (step - 0.5) + 0.05
    for name in ("amp=off", "amp=fp16", "channels_last=false", "imgcls.train + imgcls.predict --tta 4",
                 "imgcls.cv --folds 2", "torchrun --nproc_per_node 1 -m imgcls train",
                 "torchrun, 1 process: gloo + DDP + fp16 GradScaler"):
        assert re.search(rf"^  ok    {re.escape(name)}: ", out, re.M), name
    assert "skipped_steps 0" in out  # amp=fp16 reports its scaler
    assert "backend gloo, world 1, all_reduce 1" in out
    assert out.count("  skip  ") == 3 and "FAIL" not in out  # data_on_device twice, compile: each says why
    assert re.search(r"^all ok: 0 path\(s\) failed; \d+s in all$", out, re.M)


def test_the_quick_subset_of_tiny_imagenet_is_a_valid_dataset(tiny_slice, tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from imgcls import layouts

    root = gpu_check.subset(tiny_slice, tmp_path / "subset", classes=4, per_class=5, test=7)
    ds = layouts.read(root)
    ds.check()
    assert (ds.layout, ds.num_classes, ds.counts()) == ("tiny-imagenet", 4, {"train": 20, "test": 7})
