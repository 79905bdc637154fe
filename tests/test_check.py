"""Issue 18, parts 1 and 2: subset= runs that say they are one, and `imgcls check`, which runs every
stage of a real run on a few images and stops where the real run would, with its message."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import imgcls
from conftest import FAST, colour_food11
from imgcls import cli, config

SETTINGS = config.parse_overrides(FAST)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def cache_files() -> list[Path]:
    """What has been decoded into this test's cache folder (conftest's IMGCLS_CACHE)."""
    return sorted(Path(os.environ["IMGCLS_CACHE"]).glob("*.npy"))


# --- subset= -------------------------------------------------------------------------------------

def test_subset_fraction_trains_on_a_share_of_each_class_and_predicts_every_test_image(food10_slice, tmp_path):
    run = tmp_path / "run"
    result = imgcls.train(food10_slice, run, verbose=False, **{**SETTINGS, "image_size": 32, "subset": 0.25})
    manifest = json.loads((run / "manifest.json").read_text())
    subset = manifest["subset"]
    # 12 training (13 for class 8) and 4 validation images per class: round(0.25 x n) of each class
    assert subset["per_class"] == {"train": [3] * 10, "val": [1] * 10}
    assert subset["setting"] == 0.25 and subset["images_before"] == {"train": 121, "val": 40}
    assert manifest["data"]["images"] == {"train": 30, "val": 10, "test": 30}
    assert [r[0] for r in read_csv(result.submission)[1:]] == [f"{k:04d}" for k in range(1, 31)]
    page = (run / "report.html").read_text()
    assert "SUBSET RUN (subset=0.25)" in page and "not a run on the full data" in page


def test_subset_count_per_class_on_tiny_imagenet_then_its_validation_share(tiny_slice, tmp_path):
    """tiny-imagenet has no labelled validation split: subset=N takes N of each class, then 10% of
    them (at least one) are held out, as without subset=."""
    run = tmp_path / "run"
    imgcls.train(tiny_slice, run, verbose=False, **{**SETTINGS, "batch_size": 32, "subset": 3})
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["subset"]["per_class"] == {"train": [2] * 100, "val": [1] * 100}
    assert manifest["data"]["images"]["test"] == 40 and len(read_csv(run / "submission.csv")) == 41


def test_subset_is_seeded_and_stratified():
    from imgcls.data import subset_rows

    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    rows = {"train": np.arange(100), "test": np.arange(100, 110)}
    a = subset_rows(rows, labels, 0.1, seed=3)
    assert np.bincount(labels[a["train"]]).tolist() == [1, 2, 3, 4] and (a["test"] == rows["test"]).all()
    assert (subset_rows(rows, labels, 0.1, seed=3)["train"] == a["train"]).all()
    assert not (subset_rows(rows, labels, 0.1, seed=4)["train"] == a["train"]).all()
    assert np.bincount(labels[subset_rows(rows, labels, 15, seed=0)["train"]]).tolist() == [10, 15, 15, 15]


@pytest.mark.parametrize("value, fragment", [("1.5", "whole number of images per class"),
                                              ("-0.1", "fraction in (0, 1)")])
def test_subset_refuses_what_is_neither_a_fraction_nor_a_count(value, fragment):
    with pytest.raises(imgcls.UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        config.resolve(overrides={"subset": value})


def test_subset_too_small_to_validate_says_so(tiny_slice, tmp_path):
    with pytest.raises(imgcls.UserError, match="leaves 100 training and 0 validation images"):
        imgcls.train(tiny_slice, tmp_path / "run", verbose=False, **{**SETTINGS, "subset": 1})


# --- imgcls check: every stage --------------------------------------------------------------------

def test_check_runs_every_stage_in_a_temporary_folder_it_removes(food10_slice, tmp_path, monkeypatch):
    made, real = [], tempfile.TemporaryDirectory

    def recorded(*args, **kwargs):
        folder = real(*args, **kwargs)
        made.append(Path(folder.name))
        return folder
    monkeypatch.setattr(tempfile, "TemporaryDirectory", recorded)
    result = imgcls.check(food10_slice, tta=2, verbose=False, **SETTINGS)
    assert [s.name for s in result.stages] == ["settings", "model", "data", "train", "resume", "predict", "report"]
    assert result.out is None and len(made) == 1 and made[0].name.startswith("imgcls-check-")
    assert not made[0].exists()  # the run, submission and report in it are gone
    assert result.submission_rows == 8 and result.test_images == 30
    e = result.estimate
    assert e.batch_size == 8 and e.steps_per_epoch == 121 // 8 and e.epochs == 2
    assert e.images_per_second > 0 and e.epoch_seconds > 0 and e.run_seconds > e.epoch_seconds
    assert e.memory_source.startswith("CPU estimate") and e.cache_bytes == 191 * 16 * 16 * 3
    assert "plain + 2 fixed TTA views" in result.stages[5].detail


def test_check_out_keeps_a_run_directory_with_its_report(food10_slice, tmp_path, capsys):
    out = tmp_path / "kept"
    assert cli.main(["check", str(food10_slice), "--out", str(out), "--tta", "3", *FAST]) == 0
    printed = capsys.readouterr().out
    for fragment in ("check: every stage ran", "images/s at batch_size=8", "epoch ~", "whole run ~",
                     "peak memory", "CPU estimate", "submission: 8 rows checked (the real run writes all 30)"):
        assert fragment in printed, fragment
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]  # the second epoch resumed from the first's state.pt
    assert (out / "run" / "report.html").is_file() and (out / "run" / "state.pt").is_file()
    rows = read_csv(out / "submission.csv")
    assert rows[0] == ["Id", "Category"] and len(rows) == 9
    assert [r[0] for r in rows[1:]] == sorted(r[0] for r in rows[1:])


def test_check_on_labelled_images_alone_runs_every_stage_and_writes_no_submission(tmp_path, capsys):
    """imgcls tune checks its budget on a view holding the training images only: no test split to predict."""
    data = colour_food11(tmp_path / "labelled", test=0)
    assert cli.main(["check", str(data), "--out", str(tmp_path / "kept"), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "no test split" in printed and "submission: none (the data has no test split)" in printed, printed
    assert (tmp_path / "kept" / "run" / "report.html").is_file()
    assert not (tmp_path / "kept" / "submission.csv").exists()


def test_check_refuses_a_bad_tta_setting_before_decoding_with_predicts_message(food11_tiny, tmp_path):
    with pytest.raises(imgcls.UserError, match="more than the 11 fixed views") as checked:
        imgcls.check(food11_tiny, tta=12, verbose=False, **SETTINGS)
    assert cache_files() == []  # refused before a single image was decoded
    imgcls.train(food11_tiny, tmp_path / "run", verbose=False, **SETTINGS)
    with pytest.raises(imgcls.UserError) as predicted:
        imgcls.predict(tmp_path / "run", food11_tiny, tmp_path / "sub.csv", tta=12, device="cpu", progress=False)
    assert str(predicted.value) == str(checked.value)
    with pytest.raises(imgcls.UserError, match="--tta-weight is the plain view's weight"):
        imgcls.check(food11_tiny, tta=2, tta_weight=1.5, verbose=False, **SETTINGS)


def test_check_refuses_an_unwritable_or_used_out(food11_tiny, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert cli.main(["check", str(food11_tiny), "--out", str(tmp_path / "a_file" / "out"), *FAST]) == 1
    err = capsys.readouterr().err
    assert "is not writable" in err and "leave --out off" in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "state.pt").write_text("a run")
    with pytest.raises(imgcls.UserError, match="is not an empty folder"):
        imgcls.check(food11_tiny, out=tmp_path / "used", verbose=False, **SETTINGS)
    assert cache_files() == []


@pytest.mark.parametrize("model, fragment", [("tinycnnn", "Unknown model 'tinycnnn'"),
                                             ("timm:resnet18x", "timm has no model named 'resnet18x'")])
def test_check_refuses_a_model_name_typo_before_decoding(food11_tiny, model, fragment):
    with pytest.raises(imgcls.UserError, match=fragment):
        imgcls.check(food11_tiny, verbose=False, **{**SETTINGS, "model": model})
    assert cache_files() == []


def fake_gpu_memory(monkeypatch, *, most: int) -> None:
    """Training batches of more than `most` images run out of memory, as a GPU would."""
    from imgcls.models.cnn import ResCNN

    forward = ResCNN.forward

    def limited(self, x):
        if self.training and len(x) > most:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x) * 64} MiB")
        return forward(self, x)
    monkeypatch.setattr(ResCNN, "forward", limited)


def test_check_stops_where_the_real_batch_size_runs_out_of_memory_with_trains_message(food11_tiny, tmp_path,
                                                                                     monkeypatch):
    fake_gpu_memory(monkeypatch, most=8)
    assert imgcls.check(food11_tiny, verbose=False, **SETTINGS).estimate.batch_size == 8  # fits
    big = {**SETTINGS, "batch_size": 16}
    with pytest.raises(imgcls.UserError, match=r"Out of memory \(CUDA out of memory") as checked:
        imgcls.check(food11_tiny, out=tmp_path / "check", verbose=False, **big)
    with pytest.raises(imgcls.UserError) as trained:
        imgcls.train(food11_tiny, tmp_path / "train", verbose=False, **big)
    assert "batch_size=8" in str(checked.value)
    assert (str(checked.value).replace(str(tmp_path / "check" / "run"), "OUT")
            == str(trained.value).replace(str(tmp_path / "train"), "OUT"))


def test_check_plans_crowd_a_runs_changes_into_two_epochs():
    from imgcls.checking import plans

    cfg = config.resolve(overrides={"epochs": 90, "freeze_epochs": 5, "mix_off_epochs": 10, "prog_scale": 0.5,
                                    "time_limit": "11h", "seeds": "1,2"})
    first, second = plans(cfg)
    assert (first.run.epochs, second.run.epochs) == (1, 2)
    assert first.run.time_limit == second.run.time_limit == "" and first.run.seeds == second.run.seeds == ()
    assert (first.optim.freeze_epochs, second.optim.freeze_epochs) == (1, 1)  # epoch 1 frozen, epoch 2 not
    assert (first.aug.mix_off_epochs, second.aug.mix_off_epochs) == (0, 1)  # epoch 1 mixed, epoch 2 not
    from imgcls.optim import size_at
    d1, d2 = first.data, second.data
    assert size_at(0, epochs=1, size=64, scale=d1.prog_scale, end=d1.prog_end) == 32
    assert size_at(1, epochs=2, size=64, scale=d2.prog_scale, end=d2.prog_end) == 64
    assert cfg.run.epochs == 90 and cfg.run.time_limit == "11h"  # the user's settings are not changed
