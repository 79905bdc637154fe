"""Spend the budget (issue 16): epochs=auto plans the schedule for time_limit=, a final fit on every
labelled image (holdout=none, cv --refit), ensemble weights fitted on out-of-fold predictions, and the
rough edges a new user meets (a template with a byte-order mark, a batch larger than the data,
temp files a killed run left)."""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imgcls
from conftest import FAST, colour_food11
from imgcls import checkpoint, cli, config, optim, planning, tmpfiles
from test_resume import assert_same_run, child_env, count_checkpoints

SETTINGS = config.parse_overrides(FAST)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_epochs_auto_plans_a_schedule_that_ends_within_the_limit(food11_tiny, tmp_path, capsys):
    limit = 20
    t0 = time.time()
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "run"), *FAST, "epochs=auto",
                     f"time_limit={limit}s"]) == 0
    wall = time.time() - t0
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    first = plan.get("replanned", [{"from": plan["epochs"]}])[0]["from"]  # shortened if epochs outran the plan
    assert f"planned {first} epochs" in out and plan["epochs"] >= 2 and wall < limit
    assert config.resolve(file=tmp_path / "run" / "config.yaml").run.epochs == plan["epochs"]  # a resume continues it
    assert (tmp_path / "run" / "submission.csv").is_file() and (tmp_path / "run" / "report.html").is_file()


def test_the_planned_schedule_runs_to_its_end(food11_tiny, tmp_path, monkeypatch):
    """With the calibration's figures fixed (a loaded machine times steps anywhere from 15 to 800 ms), the
    run trains exactly the planned epochs and its last step has the schedule's last learning rate."""
    timing = planning.Timing(step_seconds=0.2, size=16, eval_seconds=0.1, save_seconds=0.05, n_val=9, n_test=5,
                             calibration_seconds=0.0)
    monkeypatch.setattr(planning, "calibrate", lambda trainer, files: timing)
    result = imgcls.train(food11_tiny, tmp_path / "run", verbose=False, **{**SETTINGS, "epochs": "auto",
                                                                          "time_limit": "2m"})
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    saved = config.resolve(file=tmp_path / "run" / "config.yaml")
    assert result.stopped == "done" and result.epochs_done == plan["epochs"] == saved.run.epochs > 10
    steps = plan["steps"]
    last = optim.lr_at(steps - 1, total=steps, warmup=steps // plan["epochs"],
                       peak=saved.optim.lr * saved.run.batch_size / 512, cfg=saved.optim)
    assert result.metrics[-1]["lr"] == pytest.approx(last) and last < 0.01 * saved.optim.lr * saved.run.batch_size / 512


def test_a_plan_the_epochs_outrun_is_shortened_so_the_decay_still_ends_in_time(food11_tiny, tmp_path, monkeypatch):
    """Calibration steps far faster than the real ones (a machine that slows down after the calibration):
    the plan is shortened at the first epoch's end, the run still ends inside the limit and its last step
    has the shortened schedule's last learning rate."""
    timing = planning.Timing(step_seconds=0.00005, size=16, eval_seconds=0.0005, save_seconds=0.0005, n_val=9,
                             n_test=5, calibration_seconds=0.0)
    monkeypatch.setattr(planning, "calibrate", lambda trainer, files: timing)
    limit, t0 = 12, time.time()
    result = imgcls.train(food11_tiny, tmp_path / "run", verbose=False, **{**SETTINGS, "epochs": "auto",
                                                                          "time_limit": f"{limit}s"})
    wall = time.time() - t0
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    first = plan["replanned"][0]
    assert first["after_epoch"] == 1 and first["from"] > 2 * first["epochs"]
    assert result.stopped == "done" and result.epochs_done == plan["epochs"] and wall < limit
    saved = config.resolve(file=tmp_path / "run" / "config.yaml")
    peak = saved.optim.lr * saved.run.batch_size / 512
    assert saved.run.epochs == plan["epochs"] and result.metrics[-1]["lr"] < 0.01 * peak


def test_a_time_limit_that_cuts_fixed_epochs_warns_with_what_fits(food11_tiny, tmp_path, capsys):
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "run"), *FAST, "epochs=100000",
                     "time_limit=6s"]) == 0
    out = capsys.readouterr().out
    assert "warning: time_limit=6s fits about" in out and "of the 100000 epochs" in out and "epochs=auto" in out


def test_epochs_auto_needs_a_time_limit_and_one_epoch_that_fits(food11_tiny, tmp_path):
    with pytest.raises(imgcls.UserError, match="give one too"):
        imgcls.train(food11_tiny, tmp_path / "a", verbose=False, **{**SETTINGS, "epochs": "auto"})
    with pytest.raises(imgcls.UserError, match="one epoch takes about"):
        imgcls.train(food11_tiny, tmp_path / "b", verbose=False, **{**SETTINGS, "epochs": "auto", "time_limit": "1s"})


def test_the_plan_counts_steps_at_each_progressive_size(monkeypatch):
    cfg = config.resolve(overrides={"image_size": 128, "prog_scale": 0.5, "prog_end": 0.75})
    trainer = optim.Schedule(4, 10, 32, cfg.optim, cfg.data)  # what planning.cost reads: steps and sizes
    timing = planning.Timing(step_seconds=1.0, size=128, eval_seconds=2.0, save_seconds=0.5, n_val=10, n_test=10,
                             calibration_seconds=0)
    # 4 epochs from half size: 64, 80, 96 px, then full size from epoch round(0.75 * 4) = 3 on.
    assert planning.cost(4, timing, trainer) == pytest.approx(
        sum(10 * (s / 128) ** 2 for s in (64, 80, 96, 128)) + 4 * 2.5)
    assert planning.fitting_epochs(timing, trainer, planning.cost(7, timing, trainer) + 0.1) == 7
    assert planning.fitting_epochs(timing, trainer, planning.cost(7, timing, trainer) - 0.1) == 6


def test_a_resumed_epochs_auto_run_continues_its_plan_bit_identically(tmp_path):
    """Kill an epochs=auto run after its plan at a random checkpoint, resume it: the same weights as an
    uninterrupted run with the planned epochs (the calibration restores every weight and stream)."""
    data = colour_food11(tmp_path / "data", train=16, val=4, test=6, side=16, spread=70, dark=60, ext="png", seed=1)
    env = child_env(tmp_path / "cache")
    run = [*FAST, "deterministic=true", "checkpoint_minutes=1e-5"]
    argv = lambda out, *extra: [sys.executable, "-m", "imgcls", "train", str(data), "--out", str(out), *run, *extra]  # noqa: E731
    # A short limit keeps the reference run short, but the ~6 s kept for finish() and the report plus the
    # set-up (imports, calibration: 3-5 s on 2 cores, more on a loaded machine) can leave no epoch: then the
    # run refuses to start ("Raise time_limit=") and writes no plan, so try a longer limit.
    for limit in ("12s", "24s", "48s"):
        killed = tmp_path / f"killed-{limit}"
        proc = subprocess.Popen(argv(killed, "epochs=auto", f"time_limit={limit}"), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not (killed / "plan.json").is_file():
            time.sleep(0.002)
        if (killed / "plan.json").is_file():
            break
        assert "Raise time_limit=" in json.loads((killed / "outcome.json").read_text())["error"]
    else:
        pytest.fail("no epoch fitted in time_limit=48s")
    # Within the first epoch (6 steps, a checkpoint after each): before any epoch end could shorten the plan.
    count_checkpoints(proc, killed, until=random.randint(2, 5))
    proc.kill()
    proc.wait()
    epochs = json.loads((killed / "plan.json").read_text())["epochs"]
    state = checkpoint.load_state(killed / "state.pt")
    # The same command, with a new session's time_limit (a loaded machine must not cut the rest short).
    resumed = subprocess.run(argv(killed, "epochs=auto", "time_limit=10m"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "planned" not in resumed.stdout and "stopped" not in resumed.stdout  # the saved plan, run to its end
    reference = tmp_path / "reference"
    done = subprocess.run(argv(reference, f"epochs={epochs}"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(reference, killed)
    assert state["epoch"] * 6 + state["step"] < epochs * 6  # it was killed before the end


def test_holdout_none_trains_on_every_labelled_image(food11_tiny, tmp_path, capsys):
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "run"), *FAST, "holdout=none"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["holdout"] == "none" and manifest["data"]["images"] == {"train": 24 + 9, "val": 0, "test": 5}
    assert "no validation score" in out and not (tmp_path / "run" / "val_logits.npz").exists()
    assert "val_acc" not in metrics(tmp_path / "run")[-1] and (tmp_path / "run" / "submission.csv").is_file()
    assert "holdout=none" in (tmp_path / "run" / "report.html").read_text()


def test_cv_refit_and_weights_fitted_on_out_of_fold_predictions(food11_tiny, tmp_path, capsys):
    a, b = tmp_path / "cv-a", tmp_path / "cv-b"
    assert cli.main(["cv", str(food11_tiny), "--folds", "2", "--out", str(a), *FAST, "--refit"]) == 0
    assert "refit: done" in capsys.readouterr().out
    summary = json.loads((a / "cv.json").read_text())
    best = [p["best_epoch"] for p in summary["per_fold"]]
    assert summary["refit"]["epochs"] == max(1, round(sum(best) / len(best))) and summary["submission_from"] == "refit"
    assert (a / "submission.csv").read_bytes() == (a / "refit" / "submission.csv").read_bytes()
    assert json.loads((a / "refit" / "manifest.json").read_text())["data"]["images"]["train"] == 33
    assert cli.main(["cv", str(food11_tiny), "--folds", "2", "--out", str(b), *FAST, "seed=1", "width=4"]) == 0
    capsys.readouterr()
    result = imgcls.predict([a, b], food11_tiny, tmp_path / "sub.csv", weights="oof", device="cpu", progress=False)
    assert len(result.weights) == 2 and min(result.weights) >= 0 and sum(result.weights) == pytest.approx(1)
    assert result.fitted["images"] == 33
    assert result.fitted["fitted"]["log_loss"] <= result.fitted["equal"]["log_loss"] + 1e-9


def test_template_with_a_byte_order_mark_and_its_own_header(tiny_slice, tmp_path):
    template = tiny_slice / "submission_sample.csv"
    original = template.read_bytes()
    try:
        template.write_text("\ufeffimage,category\n" + "".join(f"test_{k}.JPEG,0\n" for k in range(40)), encoding="utf-8")
        result = imgcls.train(tiny_slice, tmp_path / "run", verbose=False, **{**SETTINGS, "batch_size": 32})
        with open(result.submission, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["image", "category"] and [r[0] for r in rows[1:]] == [f"test_{k}.JPEG" for k in range(40)]
    finally:
        template.write_bytes(original)


def test_a_batch_larger_than_the_training_set_shrinks_to_what_fits(food11_tiny, tmp_path, capsys):
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "run"), *FAST, "batch_size=256"]) == 0
    out = capsys.readouterr().out
    assert "batch_size=256 is more than the 24 training images: training with batch_size=16" in out
    assert config.resolve(file=tmp_path / "run" / "config.yaml").run.batch_size == 16


def test_temp_files_of_dead_processes_are_removed_never_a_live_ones(food11_tiny, tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = tmpfiles._host()
    cache_dir, run = tmp_path / "cache", tmp_path / "run"
    for folder in (cache_dir, run):
        folder.mkdir()
        (folder / f".x.npy.{host}~{dead.pid}.tmp.npy").write_bytes(b"half")
        (folder / f".state.pt.{dead.pid}.tmp").write_bytes(b"old format, no host")
        (folder / f".y.npy.{host}~{os.getpid()}.tmp.npy").write_bytes(b"live")
        (folder / f".z.pt.other-machine~{dead.pid}.tmp").write_bytes(b"not ours to judge")
    monkeypatch.setenv("IMGCLS_CACHE", str(cache_dir))
    imgcls.train(food11_tiny, run, verbose=False, **SETTINGS)
    for folder in (cache_dir, run):
        left = {p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".tmp.npy"))}
        assert left == {f".y.npy.{host}~{os.getpid()}.tmp.npy", f".z.pt.other-machine~{dead.pid}.tmp"}, folder
