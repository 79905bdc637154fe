"""The notebook path (issue 33): run folders that cannot be mixed up, one writer at a time, atomic files,
temp folders of killed checks cleaned, commands to paste quoted, scripts without a __main__ guard, the
presets and the Kaggle notebook."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import imgcls
from conftest import FAST, REPO, colour_food11
from imgcls import cli, config, tmpfiles


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and time, but the lock's (each process that takes the folder writes its PID there)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.name != "imgcls.lock"}


def train(data: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", str(data), "--out", str(out), *FAST, *extra])


# --- 1-3: a run folder is owned, bound to what it trains, and held by one process ---------------------

def test_an_out_folder_that_is_not_an_imgcls_run_is_refused_before_a_byte_is_written(food11_tiny, tmp_path, capsys):
    working = tmp_path / "working"  # what /kaggle/working holds after a user's own cells
    (working / "sub").mkdir(parents=True)
    for name in ("notes.txt", "submission.csv", "config.yaml", "metrics.jsonl", "report.html"):
        (working / name).write_text(f"the user's {name}\n")
    before = snapshot(working)
    for argv in (["train", str(food11_tiny), "--out", str(working), *FAST],
                 ["train", str(food11_tiny), "--out", str(working), *FAST, "seeds=1,2"],
                 ["cv", str(food11_tiny), "--folds", "2", "--out", str(working), *FAST]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert f"--out {working} already holds files imgcls did not write" in err and "notes.txt" in err
        assert "subfolder such as" in err
    assert snapshot(working) == before


def test_a_run_folder_of_other_data_is_refused_and_a_finished_run_says_it_is_finished(food11_tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(food11_tiny, run, "epochs=1") == 0
    other = colour_food11(tmp_path / "other", seed=5)  # the same 3 classes, other images
    before = snapshot(run)
    assert train(other, run, "epochs=1") == 1
    err = capsys.readouterr().err
    assert f"{run} is a run of other data or settings (data: {food11_tiny}" in err and "resume=" in err
    assert train(food11_tiny, run, "epochs=2") == 1  # more epochs without resume= changes what is learned
    assert "epochs: 1 -> 2" in capsys.readouterr().err
    assert snapshot(run) == before  # nothing written by either refusal
    assert train(food11_tiny, run, "epochs=1") == 0  # the same command again: finished, nothing trained
    out = capsys.readouterr().out
    assert f"{run} is finished (1 epochs, best val_acc" in out and "nothing to train" in out
    assert snapshot(run) == before
    assert train(food11_tiny, run, f"resume={run}", "epochs=2") == 0  # resume= continues on purpose
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def holder(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A training in another process, returned once it holds its folder."""
    proc = subprocess.Popen([sys.executable, "-m", "imgcls", "train", str(data), "--out", str(out), *FAST,
                             "epochs=1000", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        if (out / "imgcls.lock").is_file() and str(proc.pid) in (out / "imgcls.lock").read_text():
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the first training never took its folder")


def test_a_second_process_is_refused_while_the_first_holds_the_folder(food11_tiny, tmp_path, capsys):
    run = tmp_path / "run"
    first = holder(food11_tiny, run)
    try:
        assert train(food11_tiny, run, "seed=2") == 1
        assert f"{run} is in use: process {first.pid}" in capsys.readouterr().err
    finally:
        first.kill()  # kill -9: the OS drops the lock with the process
        first.wait()
    assert train(food11_tiny, run, "epochs=1") == 0  # no stale lock


def test_seeds_and_cv_folders_are_held_for_the_whole_command(food11_tiny, tmp_path, capsys):
    rep = tmp_path / "rep"
    first = subprocess.Popen([sys.executable, "-m", "imgcls", "train", str(food11_tiny), "--out", str(rep), *FAST,
                              "epochs=1000", "seeds=1,2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if (rep / "seed-1" / "imgcls.lock").is_file():
                break
            time.sleep(0.05)
        assert train(food11_tiny, rep, "seeds=1,2") == 1
        assert f"{rep} is in use: process {first.pid}" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()


# --- 4-6: predict's --out, killed checks, commands to paste -------------------------------------------

def test_predict_into_a_folder_is_a_clear_error_and_leaves_nothing(food11_tiny, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert train(food11_tiny, run, "epochs=1") == 0
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["predict", str(run), "--data", str(food11_tiny), "--out", str(folder), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"--out {folder} is a folder: --out is the submission file to write" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not list(folder.iterdir())


def test_the_temp_folder_of_a_killed_check_is_removed_by_the_next_check(food11_tiny, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = Path(tmpfiles.tempfile.gettempdir()) / f"imgcls-check-{tmpfiles._host()}~{dead.pid}-abc123"
    (left / "run").mkdir(parents=True)
    (left / "run" / "state.pt").write_bytes(b"x" * 1000)
    alive = Path(tmpfiles.tempfile.gettempdir()) / f"imgcls-check-{tmpfiles._host()}~{os.getpid()}-live"
    alive.mkdir()
    try:
        imgcls.check(food11_tiny, verbose=False, **config.parse_overrides(FAST))
        assert not left.exists() and alive.is_dir()  # a live process's folder is never touched
    finally:
        alive.rmdir()


def test_a_check_stopped_by_sigterm_leaves_a_folder_the_next_check_removes(food11_tiny, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "imgcls", "check", str(food11_tiny), *FAST, "epochs=3"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        if list(tmp_path.glob("imgcls-check-*/run")):
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert list(tmp_path.glob("imgcls-check-*"))  # kill -9: its cleanup never ran
    again = subprocess.run([sys.executable, "-m", "imgcls", "check", str(food11_tiny), *FAST], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert not list(tmp_path.glob("imgcls-check-*"))


def test_ctrl_c_prints_a_resume_command_that_pastes_with_spaces_in_the_paths(food11_tiny, tmp_path):
    out = tmp_path / "ctrl c run"
    proc = subprocess.Popen([sys.executable, "-m", "imgcls", "train", str(food11_tiny), "--out", str(out), *FAST,
                             "epochs=1000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(600):
        if (out / "state.pt").is_file():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    printed = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, printed
    line = printed.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    assert line == shlex.join(["imgcls", "train", str(food11_tiny), "--out", str(out), f"resume={out}"])
    assert shlex.split(line)[4] == str(out)


# --- 7-8: presets, fold advice, --tta ---------------------------------------------------------------

def test_presets_are_named_listed_and_found_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the repository: the presets come from the package
    assert config.resolve(file="food11").run.epochs == 60 and config.resolve(file="tiny-imagenet.yaml").data.image_size == 64
    assert cli.main(["presets"]) == 0
    printed = capsys.readouterr().out
    for name in ("food11", "food11-light", "food11-strong", "tiny-imagenet", "tiny-imagenet-light",
                 "tiny-imagenet-strong"):
        assert f"{name}\n  for: " in printed
    assert "measured: its recipe on food-10" in printed
    with pytest.raises(imgcls.UserError, match="not the name of a preset .food11, food11-light"):
        config.resolve(file="food12")


def test_cv_advice_names_a_fold_count_that_works_and_negative_tta_is_refused(food11_tiny, tmp_path, capsys):
    from imgcls import crossval

    with pytest.raises(imgcls.UserError, match="Use --folds 3 or fewer"):
        crossval.stratified_folds(__import__("numpy").array([0] * 5 + [1] * 3), 4, seed=0)
    with pytest.raises(imgcls.UserError, match="single labelled image, so no fold count works") as e:
        crossval.stratified_folds(__import__("numpy").array([0] * 5 + [1]), 2, seed=0)
    assert "--folds 2 or fewer" not in str(e.value)
    run = tmp_path / "run"
    assert train(food11_tiny, run, "epochs=1") == 0
    with pytest.raises(imgcls.UserError, match="--tta is the number of test-time views besides the plain one: 0 or more"):
        imgcls.predict(run, food11_tiny, tmp_path / "s.csv", tta=-1, device="cpu")
    with pytest.raises(SystemExit):
        cli.main(["predict", str(run), "--data", str(food11_tiny), "--out", str(tmp_path / "s.csv"), "--tta", "-1"])
    assert "expected a whole number, 0 or more; got -1" in capsys.readouterr().err


# --- 9: a script without a __main__ guard ---------------------------------------------------------

SCRIPT = """
import imgcls
result = imgcls.train({data!r}, {out!r}, verbose=False, progress=False, decode_workers=2, epochs=1,
                      model="tinycnn", width=8, image_size=16, batch_size=32, device="cpu")
print("trained", result.best_epoch)
"""


def test_a_script_without_a_main_guard_trains_as_a_file_and_from_stdin(tmp_path):
    data = colour_food11(tmp_path / "data", train=100, val=10, test=10, side=16)  # 340 images: the worker pool decodes
    env = {**os.environ, "IMGCLS_CACHE": str(tmp_path / "cache-file")}
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(data=str(data), out=str(tmp_path / "a"))))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "trained 1" in done.stdout, done.stdout + done.stderr
    env["IMGCLS_CACHE"] = str(tmp_path / "cache-stdin")
    done = subprocess.run([sys.executable, "-"], input=SCRIPT.format(data=str(data), out=str(tmp_path / "b")), env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "trained 1" in done.stdout, done.stdout + done.stderr


def test_a_decoding_worker_that_dies_is_an_error_at_once(tmp_path, monkeypatch):
    from imgcls import cache

    data = colour_food11(tmp_path / "data", train=100, val=10, test=10, side=16)
    monkeypatch.setattr(cache.sys, "executable", "/bin/false")  # every worker exits at once
    t0 = time.time()
    with pytest.raises(imgcls.UserError, match="An image-decoding worker process died .exit status 1.*decode_workers=1"):
        imgcls.inspect(data, decode_workers=2, progress=False)
    assert time.time() - t0 < 30


# --- 10: the Kaggle notebook ------------------------------------------------------------------------

def test_the_kaggle_notebook_runs_top_to_bottom_on_the_demo_data(tmp_path):
    """examples/kaggle.ipynb with the demo digits standing in for /kaggle/input and a one-minute budget."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from imgcls.digits import write_digits

    data = write_digits(tmp_path / "input" / "food11")
    settings = {"model": "tinycnn", "width": 8, "image_size": 32, "cache_size": 0, "batch_size": 64, "hflip": 0,
                "decode_workers": 1, "progress": False, "device": "cpu"}
    env = {"IMGCLS_DATA": str(data), "IMGCLS_WHEELS": str(tmp_path / "no-wheels"), "IMGCLS_WORK": str(tmp_path / "work"),
           "IMGCLS_PREVIOUS": str(tmp_path / "none"), "IMGCLS_TIME_LIMIT": "44s", "IMGCLS_FOLDS": "2", "IMGCLS_TTA": "2",
           "IMGCLS_SETTINGS": json.dumps(settings), "IMGCLS_CACHE": str(tmp_path / "cache")}
    nb = nbformat.read(REPO / "examples" / "kaggle.ipynb", as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits them
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "every stage ran" in text and "best val_acc" in text and "out-of-fold accuracy" in text
    assert (tmp_path / "work" / "submission.csv").is_file() and "ensemble:" in text
    assert any("text/html" in o.get("data", {}) and "imgcls report" in o["data"]["text/html"] for o in outputs)
