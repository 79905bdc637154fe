"""Dependencies that fit notebooks (issue 17): installing imgcls where torch is already installed (a
Kaggle or Colab image with its own CUDA build) leaves torch and torchvision as they are."""
from __future__ import annotations

import json
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
