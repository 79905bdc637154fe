"""Dependencies that fit notebooks (issue 17): installing imgcls where torch is already installed (a
Kaggle or Colab image with its own CUDA build) leaves torch and torchvision as they are."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement

from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def test_pip_install_keeps_the_torch_that_is_there(tmp_path):
    """pip's own resolver and its configured index, in this environment, which holds torch: the plan
    (--dry-run --report) installs imgcls and nothing of torch's. (Building imgcls's metadata fetches
    setuptools into pip's isolated build environment.)"""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "imgcls" in planned
    assert "torch" not in planned and "torchvision" not in planned, planned


def test_declared_versions_admit_the_installed_and_newer_torch():
    reqs = declared()
    for name, newer in (("torch", "2.20.0"), ("torchvision", "0.35.0")):
        spec = reqs[name].specifier
        assert spec.contains(version(name).split("+")[0]), (name, version(name), spec)
        assert spec.contains(newer), f"{name}{spec} would make pip replace a notebook's newer {name} {newer}"


def test_the_wheel_with_no_deps_in_a_fresh_venv_trains_with_a_packaged_preset(tmp_path, food11_tiny):
    """As on Kaggle (issue 33): build the wheel, install it with --no-deps into a new environment outside
    the repository that already has torch and the rest (here: this one's site-packages), and train with
    `--config food11`, the preset inside the wheel."""
    from conftest import FAST

    dist, venv = tmp_path / "dist", tmp_path / "venv"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                            "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    wheel = next(dist.glob("imgcls-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a checkout on PYTHONPATH would shadow the wheel
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    where = subprocess.run([str(python), "-c", "import imgcls; print(imgcls.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's imgcls, not this checkout's
    run = tmp_path / "run"
    train = subprocess.run([str(venv / "bin" / "imgcls"), "train", str(food11_tiny), "--out", str(run),
                            "--config", "food11", *FAST, "epochs=1"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    saved = (run / "config.yaml").read_text()
    assert "cache_size: 144" in saved and (run / "submission.csv").is_file()  # the preset's own key, from the wheel
