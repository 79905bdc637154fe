"""benchmarks/device_run.sh (issue 34) on the CPU, on a tiny subset cut by benchmarks/subset_tiny.py from
the real tarball: the script the device tool's `run` calls once on a lent GPU must not rot between loans."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import REPO, SHARED_DATA

SCRIPT = REPO / "benchmarks" / "device_run.sh"
TARBALL = SHARED_DATA / "tiny-imagenet-100.tar.gz"
TINY = ["model=tinycnn", "width=8", "image_size=32", "decode_workers=1"]  # the recipe file, a tiny model


def subset_tiny():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import subset_tiny
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return subset_tiny


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """3 classes x 20 training images and 10 test images, as the .tar.gz that `carry` would take."""
    if not TARBALL.is_file():
        pytest.skip(f"{TARBALL} is absent: the device-run test needs ../shared/data beside the checkout")
    out = tmp_path_factory.mktemp("devdata") / "tiny3.tar.gz"
    cut = subset_tiny().cut(TARBALL, out, classes=3, per_class=20, test=10)
    assert (cut.classes, cut.train, cut.test) == (3, 60, 10)
    return out


def run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--work", str(tmp_path / "work"), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_the_subset_is_a_dataset_with_a_matching_template(tiny3, tmp_path):
    from imgcls import layouts

    with tarfile.open(tiny3) as tar:
        names = tar.getnames()
        assert {n.split("/")[0] for n in names} == {"tiny3"}  # one top folder, named like the file
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "tiny3"
    ds = layouts.read(root)
    ds.check()
    assert (ds.layout, ds.counts()) == ("tiny-imagenet", {"train": 60, "test": 10})
    wnids = (root / "wnids.txt").read_text().split()
    with tarfile.open(TARBALL) as tar:  # the first 3 lines of the full set's wnids.txt, in file order
        full = tar.extractfile("tiny-imagenet-100/wnids.txt").read().decode().split()
    assert ds.classes == wnids == full[:3]
    assert [r[0] for r in csv.reader(open(root / "submission_sample.csv"))] == \
        ["image_id"] + [f"test_{k}.JPEG" for k in range(10)]
    assert [line.split("\t")[0] for line in (root / "words.txt").read_text().splitlines()] == wnids
    assert "first 3 of 100 classes" in (root / "SUBSET.txt").read_text()
    # The same cut again is the same file, byte for byte.
    again = subset_tiny().cut(TARBALL, tmp_path / "tiny3.tar.gz", classes=3, per_class=20, test=10)
    assert again.out.read_bytes() == tiny3.read_bytes()


def test_device_run_on_the_cpu_ends_with_a_passing_table_and_a_submission(tiny3, tmp_path):
    t0 = time.perf_counter()
    # gpu_check's paths each run in tests/test_gpu_check.py: here one of them, to see the table take its lines.
    proc = run(tmp_path, "--data", str(tiny3), "--time-limit", "12",
               "--gpu-check-args", "--quick --sizes 16 --paths amp=off", "--", *TINY)
    print(proc.stdout[-6000:], proc.stderr[-3000:], f"\n{time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr
    out = tmp_path / "out"
    table = (out / "summary.txt").read_text().splitlines()
    assert proc.stdout.rstrip().splitlines()[-len(table):] == table  # the table is printed last
    assert table[-1] == "result: PASS"
    assert table[1].startswith("data: tiny-imagenet-100 subset: the first 3 of 100 classes")
    for step in ("setup", "environment", "data", "gpu_check", "train"):
        assert re.search(rf"^{step} +PASS +\d+\.\d  \S", "\n".join(table), re.M), step
    assert re.search(r"^gpu_check .* paths 1 ok, 0 FAIL, \d+ skip; all ok", "\n".join(table), re.M)  # --paths amp=off
    assert re.search(r"^train .* best val_acc \d\.\d{4} at epoch \d+, \d+ of \d+ planned epochs, wall \d+s, "
                     r"submission 10 rows$", "\n".join(table), re.M)
    assert any(line.startswith("  tinycnn:8 ") for line in table)  # gpu_check's figures
    # What comes back from the device: at most 8 plain files, none in a folder, each under 16 MiB.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.yaml", "log.txt", "metrics.jsonl", "plan.json", "report.html", "submission.csv",
                     "summary.txt"]
    assert all((out / f).stat().st_size < 16 * 2 ** 20 for f in files)
    assert "=== gpu_check" in (out / "log.txt").read_text() and "submission ok: 10 rows" in (out / "log.txt").read_text()
    rows = list(csv.reader(open(out / "submission.csv")))
    assert [r[0] for r in rows] == ["image_id"] + [f"test_{k}.JPEG" for k in range(10)]
    assert all(r[1] in ("0", "1", "2") for r in rows[1:])


def test_a_failed_step_does_not_stop_the_others_and_the_exit_status_says_so(tiny3, tmp_path):
    # set-up and environment (an interpreter start each) pass in the test above; here the installed imgcls trains.
    proc = run(tmp_path, "--data", str(tiny3), "--skip", "setup", "--skip", "environment", "--skip", "gpu_check",
               "--", "no_such_setting=1")
    assert proc.returncode == 1, proc.stdout[-4000:]
    table = (tmp_path / "out" / "summary.txt").read_text()
    assert re.search(r"^setup +SKIP ", table, re.M) and re.search(r"^environment +SKIP ", table, re.M)
    assert re.search(r"^gpu_check +SKIP ", table, re.M) and re.search(r"^train +FAIL\(1\) .* NO submission$", table, re.M)
    assert re.search(r"^data +PASS ", table, re.M) and table.rstrip().endswith("result: FAIL: train")
