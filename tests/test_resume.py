"""Nothing lost (issue 5): SIGKILL / Ctrl-C / time_limit= and resume, unsafe files, NaN, OOM,
a full disk, and the rules record.

The kill tests run the real CLI in a subprocess (`python -m imgcls train`) in deterministic mode
with a checkpoint after every step (checkpoint_minutes=1e-5: 0.6 ms), stop it at a random point, resume,
and compare the result bit for bit with an uninterrupted run. IMGCLS_KILLS=N runs N kill points
(default 1) and IMGCLS_KILL_SEED fixes them; each point is printed (pytest -s shows it).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FAST, colour_food11
from imgcls import cache, checkpoint, cli, config, planning, tmpfiles, trainer
from imgcls.errors import UserError

# Every epoch-level field except the timings, which differ between any two runs.
DETERMINISTIC = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
RUN = [*FAST, "epochs=3", "deterministic=true", "checkpoint_minutes=1e-5"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """food-11 layout, 3 classes x 16 training (6 steps of 8 per epoch), 4 validation each, 6 test."""
    return colour_food11(tmp_path_factory.mktemp("colours") / "data", train=16, val=4, test=6, side=16, spread=70,
                         dark=60, ext="png", seed=1)


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "imgcls", "train", str(data), "--out", str(out), *RUN, *extra]


def child_env(cache_dir: Path) -> dict:
    return {**os.environ, "IMGCLS_CACHE": str(cache_dir)}


@pytest.fixture(scope="module")
def reference(colours, tmp_path_factory):
    return run_reference(colours, tmp_path_factory)


def run_reference(colours: Path, tmp_path_factory, *extra: str) -> dict:
    """An uninterrupted run (RUN + `extra` settings), and how many checkpoints it wrote (the kill points
    to draw from)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    env = child_env(tmp_path_factory.mktemp("cache"))
    proc = subprocess.Popen(train_argv(colours, out, *extra), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    checkpoints = count_checkpoints(proc, out)
    output = proc.communicate()[0]
    assert proc.returncode == 0, output
    return {"run": out, "checkpoints": checkpoints, "env": env, "extra": extra}


def count_checkpoints(proc: subprocess.Popen, out: Path, until: int | None = None) -> int:
    """Count the state.pt files the run writes (each is a new inode: temp file + rename), polling every
    millisecond, until the process ends or `until` have been seen."""
    seen, last = 0, None
    while proc.poll() is None and (until is None or seen < until):
        try:
            inode = (out / "state.pt").stat().st_ino
        except FileNotFoundError:
            inode = None
        if inode is not None and inode != last:
            seen, last = seen + 1, inode
        time.sleep(0.001)
    return seen


def assert_same_run(a: Path, b: Path) -> None:
    """Same weights (best, last, and the state's model/optimizer), metrics, logits and submission, bit for bit."""
    for name in ("best.safetensors", "last.safetensors", "submission.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in ("val_logits.npz", "test_logits.npz"):
        with np.load(a / name) as za, np.load(b / name) as zb:
            np.testing.assert_array_equal(za["logits"], zb["logits"])
    keep = lambda path: [{k: m[k] for k in DETERMINISTIC} for m in map(json.loads, path.read_text().splitlines())]
    assert keep(a / "metrics.jsonl") == keep(b / "metrics.jsonl")
    sa, sb = checkpoint.load_state(a / "state.pt"), checkpoint.load_state(b / "state.pt")
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for i, bufs in sa["optimizer"]["state"].items():  # every buffer of whichever optimizer (LAMB: exp_avg, ...)
        assert bufs.keys() == sb["optimizer"]["state"][i].keys() and bufs, i
        for name, buf in bufs.items():
            assert torch.equal(torch.as_tensor(buf), torch.as_tensor(sb["optimizer"]["state"][i][name])), (i, name)
    assert (sa["epoch"], sa["step"], sa["finished"]) == (sb["epoch"], sb["step"], True)
    assert sa.get("scaler") == sb.get("scaler")  # fp16: loss scale and growth tracker; {} otherwise


def kill_once(colours: Path, reference: dict, out: Path, rng: random.Random) -> str:
    """SIGKILL the CLI at a random point: after a random number of its checkpoints (1 .. as many as the
    reference run wrote, the last one being the finished state) plus a random 0-60 ms. Returns where it
    was, from the state.pt it left."""
    for _ in range(5):  # checkpoints are time-based, so a run may write fewer: then draw again
        k, delay = rng.randint(1, reference["checkpoints"]), rng.uniform(0, 0.06)
        proc = subprocess.Popen(train_argv(colours, out, *reference["extra"]), env=reference["env"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        count_checkpoints(proc, out, until=k)
        time.sleep(delay)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            state = checkpoint.load_state(out / "state.pt")
            metrics = (out / "metrics.jsonl").read_text().count("\n")
            where = ("training finished, in finish()" if state["finished"] else "epoch end" if state["step"] == 0 else
                     "all steps done, before the epoch-end evaluation" if state["step"] == 6 else "mid-epoch")
            return (f"killed {delay * 1000:.0f} ms after checkpoint {k} of ~{reference['checkpoints']}; state.pt: "
                    f"epoch {state['epoch']}, step {state['step']} of 6 ({where}), {metrics} metrics line(s)")
        for p in out.iterdir():
            p.unlink()
    pytest.fail("the run kept finishing before the kill")


def test_sigkill_at_random_points_then_resume_is_bit_identical(colours, reference, tmp_path):
    kill_and_resume(colours, reference, tmp_path)


def kill_and_resume(colours: Path, reference: dict, tmp_path: Path) -> list[Path]:
    """IMGCLS_KILLS random SIGKILLs of the reference's command, each resumed and compared with it bit for
    bit; returns the resumed run directories."""
    # SystemRandom: an in-process training earlier in the session has called random.seed(seed=) (state.seed_everything)
    seed = int(os.environ.get("IMGCLS_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    rng = random.Random(seed)
    runs = []
    for k in range(int(os.environ.get("IMGCLS_KILLS", "1"))):
        out = tmp_path / f"killed-{k}"
        where = kill_once(colours, reference, out, rng)
        result = subprocess.run(train_argv(colours, out, *reference["extra"]), env=reference["env"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"resuming from {out / 'state.pt'}" in result.stdout
        assert_same_run(reference["run"], out)
        print(f"\nkill seed {seed} #{k}{' ' + ' '.join(reference['extra']) if reference['extra'] else ''}: {where}: "
              "resumed, bit-identical")
        runs.append(out)
    return runs


def test_ctrl_c_saves_and_a_resume_elsewhere_is_bit_identical(colours, reference, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(train_argv(colours, out), env=reference["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    count_checkpoints(proc, out, until=random.randint(1, max(1, reference["checkpoints"] // 2)))
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "stopped on a signal (Ctrl-C or SIGTERM) after" in output and f"state is saved in {out / 'state.pt'}" in output
    assert f"Resume with:\n  imgcls train {colours} --out {out} resume={out}" in output
    assert not checkpoint.load_state(out / "state.pt")["finished"]
    assert not (out / "submission.csv").exists()
    # Kaggle style: the interrupted run is read-only input, the resumed one writes elsewhere.
    elsewhere = tmp_path / "continued"
    result = subprocess.run([sys.executable, "-m", "imgcls", "train", str(colours), "--out", str(elsewhere),
                             f"resume={out}"], env=reference["env"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        assert_same_run(reference["run"], elsewhere)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- interrupted run:\n{output}\n--- resumed run:\n{result.stdout}") from None


def test_time_limit_stops_saves_writes_the_submission_and_says_how_to_resume(food11_tiny, tmp_path, capsys):
    run = tmp_path / "run"
    # One epoch first: the libraries a run imports on first use (timm, torchvision: 2-3 s on a slow 2-core CPU)
    # would otherwise eat the 8 s when this test runs alone, and it stops before its first epoch.
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "warm"), *FAST, "epochs=1"]) == 0
    capsys.readouterr()
    t0 = time.time()
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, "epochs=100000", "time_limit=8s"]) == 0
    elapsed = time.time() - t0
    out = capsys.readouterr().out
    print(out, f"time_limit=8s: returned after {elapsed:.2f}s")
    assert "stopped to stay within time_limit=8s after" in out
    assert f"Resume with:\n  imgcls train {food11_tiny} --out {run} resume={run}" in out
    state = checkpoint.load_state(run / "state.pt")
    assert not state["finished"] and 1 <= state["epoch"] < 100000
    # The submission comes from the best weights, not the last ones.
    again = tmp_path / "from-best.csv"
    assert cli.main(["predict", str(run), "--data", str(food11_tiny), "--out", str(again), "--device", "cpu"]) == 0
    assert again.read_text() == (run / "submission.csv").read_text()
    # Resuming continues from the saved epoch (with the run's own settings, read from config.yaml).
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert cli.main(["train", str(food11_tiny), "--out", str(run), "resume=" + str(run), "epochs=" + str(done + 2),
                     "time_limit="]) == 0
    assert [json.loads(m)["epoch"] for m in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, done + 3))


def test_stop_reserve_keeps_time_for_the_evaluation_and_the_submission():
    # 1 s per 100 validation images: 2 s to evaluate, then 2 s (val) + 3 s (300 test images) in finish(),
    # a 0.5 s step, and a margin of 10% of the limit, at most a minute.
    assert planning.stop_reserve(eval_seconds=2.0, step_seconds=0.5, n_val=200, n_test=300, limit=100) == 0.5 + 2 + 5 + 10
    assert planning.stop_reserve(eval_seconds=0, step_seconds=0, n_val=1, n_test=0, limit=11.5 * 3600) == 60


class CreatesAFile:
    """Unpickling this runs open(path, "w"): code execution, made harmless and visible."""
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_pickle(path: Path, payload, kind: str) -> None:
    if kind == "torch-zip":
        torch.save(payload, path)
    else:
        import pickle
        path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("kind", ["torch-zip", "plain-pickle"])
def test_malicious_state_pt_is_refused_and_runs_nothing(food11_tiny, tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    state = lambda path: {"model": CreatesAFile(path), "optimizer": {}, "epoch": 0, "step": 0}
    write_pickle(run / "state.pt", state(marker), kind)
    # The same kind of file, read with the unsafe loader, does create its file: this test can fail.
    write_pickle(tmp_path / "control.pt", state(tmp_path / "control"), kind)
    try:
        torch.load(tmp_path / "control.pt", weights_only=False)
    except RuntimeError:  # a plain pickle: torch unpickles it (running it) as its magic number, then complains
        pass
    assert (tmp_path / "control").exists()

    for argv in (["--out", str(run)], ["--out", str(tmp_path / "new"), f"resume={run}"]):
        assert cli.main(["train", str(food11_tiny), *argv, *FAST]) == 1
        err = capsys.readouterr().err
        assert f"Refused to load {run / 'state.pt'}: it holds Python objects other than tensors" in err
        assert "Nothing from it was executed" in err
        assert ("it would call io.open" if kind == "torch-zip" else "the safe unpickler stopped at") in err
        assert not marker.exists()


def test_malicious_weights_are_refused_and_run_nothing(food11_tiny, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.safetensors"
    torch.save({"conv.weight": CreatesAFile(marker)}, evil)  # a pickle wearing a .safetensors name
    torch.save({"conv.weight": CreatesAFile(marker)}, tmp_path / "weights.pt")
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "r1"), *FAST, f"init={evil}"]) == 1
    assert f"{evil} is not a valid safetensors file" in capsys.readouterr().err
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "r2"), *FAST, f"init={tmp_path / 'weights.pt'}"]) == 1
    assert "is not a .safetensors file. imgcls loads weights only from safetensors" in capsys.readouterr().err
    # predict loads a run's best weights the same way
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, "epochs=1"]) == 0
    (run / "best.safetensors").write_bytes(evil.read_bytes())
    assert cli.main(["predict", str(run), "--data", str(food11_tiny), "--out", str(tmp_path / "s.csv"),
                     "--device", "cpu"]) == 1
    assert "is not a valid safetensors file" in capsys.readouterr().err
    assert not marker.exists()


def test_damaged_state_pt_says_so(food11_tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, "epochs=1"]) == 0
    data = (run / "state.pt").read_bytes()
    (run / "state.pt").write_bytes(data[:len(data) // 2])  # a half-uploaded checkpoint
    assert cli.main(["train", str(food11_tiny), "--out", str(run), f"resume={run}", "epochs=2"]) == 1
    assert f"{run / 'state.pt'} is damaged or not a torch checkpoint" in capsys.readouterr().err


def test_resume_with_another_model_is_refused_with_a_message(food11_tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, "epochs=1"]) == 0
    assert cli.main(["train", str(food11_tiny), "--out", str(run), f"resume={run}", "epochs=2", "width=16"]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'state.pt'} does not fit this model and settings" in err and "do not override model=" in err


def test_resume_of_a_run_without_state_is_refused(food11_tiny, tmp_path, capsys):
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "r"), *FAST, f"resume={tmp_path}"]) == 1
    assert f"resume={tmp_path}: there is no state.pt in {tmp_path}" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(food11_tiny, tmp_path, capsys, monkeypatch):
    calls = []

    def loss_turning_nan(logits, targets, **kw):
        calls.append(1)
        loss = train_loss(logits, targets, **kw)
        return loss * float("nan") if len(calls) > 7 else loss  # epoch 3 (3 steps per epoch), step 2

    train_loss = trainer.loss_fn
    monkeypatch.setattr(trainer, "loss_fn", loss_turning_nan)
    run = tmp_path / "run"
    # checkpoint_minutes=1e-9: a checkpoint is due after every step, so the NaN step is the first that must not save.
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, "epochs=5", "checkpoint_minutes=1e-9"]) == 1
    err = capsys.readouterr().err
    assert "Training diverged: loss is nan in epoch 3 by step 2" in err and "Lower lr=" in err
    state = checkpoint.load_state(run / "state.pt")
    assert (state["epoch"], state["step"]) == (2, 1)  # after the last finite step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in load_file(run / "last.safetensors").values() if v.is_floating_point())


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1e12 bytes")])
def test_out_of_memory_names_the_setting_to_change(food11_tiny, tmp_path, capsys, monkeypatch, error):
    def oom(*args, **kw):
        raise error
    monkeypatch.setattr(trainer, "loss_fn", oom)
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "r"), *FAST]) == 1
    err = capsys.readouterr().err
    assert f"Out of memory ({error})" in err and "Lower batch_size= (e.g. batch_size=4" in err
    assert "accum_steps=2" in err and "eval_batch_size=" in err and "Traceback" not in err


def test_full_disk_while_checkpointing_names_the_setting(food11_tiny, tmp_path, capsys, monkeypatch):
    writes = []
    fsync = os.fsync

    def full_after_three(fd):  # config.yaml, manifest.json, metrics.jsonl fit; the first checkpoint does not
        writes.append(fd)
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)
    monkeypatch.setattr(tmpfiles.os, "fsync", full_after_three)
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "r"), *FAST]) == 1
    err = capsys.readouterr().err
    assert f"The disk is full while writing {tmp_path / 'r'}" in err and "(--out)" in err
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]  # no half-written files left


def test_full_disk_while_building_the_cache_names_the_setting(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache.os, "posix_fallocate", full)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match=r"Not enough disk space for the image cache .* set cache_dir="):
        cache.build([tmp_path / "a.png"], size=8, cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_pretrained_forbid_refuses_init(tmp_path):
    with pytest.raises(UserError, match="pretrained=forbid refuses initial weights, but init="):
        config.resolve(overrides=["pretrained=forbid", f"init={tmp_path / 'w.safetensors'}"])


def test_manifest_records_initial_weights_and_their_sha256(food11_tiny, tmp_path):
    first = tmp_path / "first"
    assert cli.main(["train", str(food11_tiny), "--out", str(first), *FAST, "epochs=1"]) == 0
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["pretrained"] is False and manifest["external_data"] is False
    weights = first / "best.safetensors"
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "second"), *FAST, "epochs=1",
                     f"init={weights}"]) == 0
    manifest = json.loads((tmp_path / "second" / "manifest.json").read_text())
    pretrained = manifest["pretrained"]
    assert {k: pretrained[k] for k in ("path", "sha256")} == {"path": str(weights.resolve()),
                                                            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert pretrained["reinitialised"] == [] and pretrained["head"] == ["head.3"]  # same classes: all of it loaded
