"""imgcls tune (issue 36): Optuna's search over the recipe, every trial an ordinary run, resumable, several
workers sharing one study, pruning, a best.yaml that reproduces its trial, and errors that say what to fix."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imgcls
from conftest import colour_food11
from imgcls import cli, config, tuning

optuna = pytest.importorskip("optuna")

# A few-thousand-parameter CNN at 16 px on the CPU, deterministic (threads stay fixed: a trial and its rerun
# from best.yaml then score alike).
BASE = {"model": "tinycnn", "width": 8, "image_size": 16, "epochs": 3, "batch_size": 8, "device": "cpu",
        "decode_workers": 1, "deterministic": True}
ARGV = [f"{k}={v}" for k, v in BASE.items()]
SPACE = {"lr": [0.2, 0.4], "label_smoothing": [0.0, 0.1]}


@pytest.fixture
def data(tmp_path) -> Path:
    return colour_food11(tmp_path / "data", train=12, val=4, test=5)


def space_file(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(json.dumps(space))  # JSON is YAML
    return path


def test_a_study_runs_trials_as_run_folders_and_recommends_a_confirmed_best(data, tmp_path, capsys):
    out = tmp_path / "tune"
    assert cli.main(["tune", str(data), "--out", str(out), "--trials", "3", "--space", str(space_file(tmp_path, SPACE)),
                     *ARGV]) == 0
    printed = capsys.readouterr().out
    found = tuning.status(out)
    assert sum(found["counts"].get(k, 0) for k in ("complete", "pruned")) == 3 and found["counts"]["complete"] >= 1
    assert "trials: " + ", ".join(f"{n} {k}" for k, n in sorted(found["counts"].items())) in printed
    for r in found["rows"]:  # every trial is an ordinary run folder
        run = out / r["run"]
        assert (run / "config.yaml").is_file() and (run / "manifest.json").is_file() and (run / "report.html").is_file()
    assert (out / "best.yaml").is_file() and (out / "report.html").is_file() and "optimization history" in \
        (out / "report.html").read_text()
    assert "its settings over 3 seed(s): final val_acc" in printed  # the best, trained again with 2 more seeds
    assert len(list((out / "confirm").glob("seed-*/outcome.json"))) == 2
    # The same command continues the study: one more trial to reach 4, the first three kept.
    assert cli.main(["tune", str(data), "--out", str(out), "--trials", "4", "--space", str(space_file(tmp_path, SPACE)),
                     "--confirm", "0", *ARGV]) == 0
    assert sum(tuning.status(out)["counts"].get(k, 0) for k in ("complete", "pruned")) == 4
    assert cli.main(["tune", "--status", str(out)]) == 0
    assert "best so far: trial" in capsys.readouterr().out


def test_best_yaml_reproduces_its_trial_score_with_the_same_seed(data, tmp_path):
    out = tmp_path / "tune"
    result = imgcls.tune(data, out, trials=2, space=space_file(tmp_path, SPACE), confirm=0, verbose=False, **BASE)
    rerun = imgcls.train(data, tmp_path / "again", config=result.best_config, verbose=False)
    assert rerun.final_val_acc == result.best["value"]
    assert config.resolve(file=result.best_config).data.split_seed == 0  # the study's split, whatever seed= is given


def test_the_pruner_stops_a_bad_trial_after_its_first_epoch(data, tmp_path):
    study = tuning.Study(str(data), str(tmp_path / "tune"), {**BASE, "epochs": 4}, {"lr": [0.4, 1e-7]}, trials=3,
                         deadline=0.0, seed=0, storage="")
    (tmp_path / "tune").mkdir()
    found = tuning.load_study(study)
    for lr in (0.4, 0.4, 1e-7):  # two good trials, then one that cannot learn
        found.enqueue_trial({"lr": lr})
    tuning.work(study, lambda text: None)
    trials = found.get_trials(deepcopy=False)
    assert [t.state.name for t in trials][:2] == ["COMPLETE", "COMPLETE"] or trials[0].state.name == "COMPLETE"
    assert trials[2].state.name == "PRUNED" and trials[2].params == {"lr": 1e-7}
    metrics = (tmp_path / "tune" / "trial-2" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) < 4  # stopped early, not trained to its end
    assert json.loads((tmp_path / "tune" / "trial-2" / "outcome.json").read_text())["status"] == "pruned"


def test_two_workers_share_the_study_and_survive_a_kill_of_one(data, tmp_path):
    out = tmp_path / "tune"
    argv = [sys.executable, "-m", "imgcls", "tune", str(data), "--out", str(out), "--trials", "4", "--workers", "2",
            "--confirm", "0", "--space", str(space_file(tmp_path, SPACE)), *ARGV, "epochs=4"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    for _ in range(1200):  # kill -9 the worker that trains trial 0, while it trains
        lock = out / "trial-0" / "imgcls.lock"
        if lock.is_file() and lock.read_text() and (out / "trial-0" / "state.pt").is_file():
            victim = json.loads(lock.read_text())["pid"]
            break
        time.sleep(0.02)
    assert victim, "no worker started trial 0"
    import os

    os.kill(victim, signal.SIGKILL)
    printed = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, printed
    assert "ended with exit status -9" in printed
    found = tuning.status(out)
    assert sum(found["counts"].get(k, 0) for k in ("complete", "pruned")) == 4  # exactly the count asked for
    assert found["counts"].get("fail", 0) >= 1 and not found["running"]
    retried = [r for r in found["rows"] if r["trial"] > 0 and r["params"] == found["rows"][0]["params"]]
    assert retried  # the killed trial's settings were tried again


def test_bad_spaces_and_budgets_say_what_to_fix(data, tmp_path):
    with pytest.raises(imgcls.UserError, match="'learning_rate' is not a setting"):
        imgcls.tune(data, tmp_path / "a", space=space_file(tmp_path, {"learning_rate": [0.1]}), verbose=False, **BASE)
    with pytest.raises(imgcls.UserError, match="The search space is empty"):
        imgcls.tune(data, tmp_path / "b", space=space_file(tmp_path, {"lr": [0.1]}), verbose=False, **{**BASE, "lr": 0.2})
    with pytest.raises(imgcls.UserError, match="aug='huge' is not one of"):
        imgcls.tune(data, tmp_path / "c", space=space_file(tmp_path, {"aug": ["light", "huge"]}), verbose=False, **BASE)
    with pytest.raises(imgcls.UserError, match=r"--time-limit 2s is too short: one trial takes about [\dhms]+ here "
                                               r"\(imgcls check's estimate"):
        imgcls.tune(data, tmp_path / "d", time_limit="2s", space=space_file(tmp_path, SPACE), verbose=False,
                    **{**BASE, "epochs": 50})
    with pytest.raises(imgcls.UserError, match="epochs=N, not epochs=auto"):
        imgcls.tune(data, tmp_path / "e", space=space_file(tmp_path, SPACE), verbose=False,
                    **{**BASE, "epochs": "auto"})


def test_a_trial_starts_only_when_a_whole_one_fits_before_the_deadline():
    """A trial cut by the time limit is a failed trial that told the search nothing: before one finishes the
    check's estimate decides, after that the longest finished trial, with 10% to spare."""
    import datetime

    from optuna.trial import TrialState, create_trial

    now, said = time.time(), []
    study = tuning.Study("data", "out", {}, SPACE, 0, deadline=now + 100, seed=0, storage="", trial_seconds=80)
    found = optuna.create_study()
    assert tuning.whole_trial_fits(found, study, said.append)  # 100 s left, 88 s needed
    assert not tuning.whole_trial_fits(found, dataclasses.replace(study, trial_seconds=95), said.append)
    assert "a whole trial takes about" in said[-1]
    done = create_trial(state=TrialState.COMPLETE, value=0.5)
    done.datetime_complete = datetime.datetime.now()
    done.datetime_start = done.datetime_complete - datetime.timedelta(seconds=120)  # longer than the estimate
    found.add_trial(done)
    assert not tuning.whole_trial_fits(found, study, said.append)
    assert tuning.whole_trial_fits(found, dataclasses.replace(study, deadline=now + 140), said.append)


def test_a_time_limited_study_ends_with_no_trial_cut_by_the_limit(tmp_path):
    """Trials start only while a whole one fits and then run to their end: before 7243aa4 a trial started
    with seconds left and its run's finish reserve stopped it at once, a failed trial (81 of 201 here)."""
    data = colour_food11(tmp_path / "data", train=12, val=4, test=0)
    out = tmp_path / "tune"
    assert cli.main(["tune", str(data), "--out", str(out), "--time-limit", "15s", "--confirm", "0", *ARGV]) == 0
    counts = tuning.status(out)["counts"]
    assert counts.get("complete", 0) >= 1 and "fail" not in counts, counts
