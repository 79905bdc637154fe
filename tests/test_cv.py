"""Cross validation, out-of-fold predictions, TTA, ensembles, seeded repeats and the GPU job runner."""
from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch

from conftest import FAST
from imgcls import cli, crossval, ensemble, inference, jobs, layouts, rundir
from imgcls.hardware import Hardware
from imgcls.models import create_model

CPU = Hardware(torch.device("cpu"), None, False)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def labelled_ids(root):
    ds = layouts.read(root)
    return {s.id: s.label for split in ("train", "val") for s in ds.splits.get(split, [])}


# --- folds --------------------------------------------------------------------------------------

def test_folds_are_disjoint_stratified_cover_everything_and_seeded():
    labels = np.repeat(np.arange(4), [23, 17, 10, 5])
    np.random.default_rng(0).shuffle(labels)
    fold = crossval.stratified_folds(labels, 5, seed=3)
    assert fold.shape == labels.shape and set(fold.tolist()) == set(range(5))  # each image in exactly one fold
    for c, n in zip(range(4), (23, 17, 10, 5)):
        per_fold = np.bincount(fold[labels == c], minlength=5)
        assert per_fold.sum() == n and per_fold.max() - per_fold.min() <= 1, (c, per_fold)
    np.testing.assert_array_equal(fold, crossval.stratified_folds(labels, 5, seed=3))
    assert (fold != crossval.stratified_folds(labels, 5, seed=4)).any()


def test_a_class_smaller_than_k_is_a_user_error():
    with pytest.raises(cli.UserError, match="fewer labelled images than the 5 folds"):
        crossval.stratified_folds(np.array([0] * 10 + [1] * 3), 5, seed=0)


# --- cv end to end ------------------------------------------------------------------------------

def test_cv_writes_fold_runs_oof_summary_submission_and_reruns_a_failed_fold_alone(
        food11_tiny, tmp_path, monkeypatch, capsys):
    from imgcls import training

    out = tmp_path / "cv"
    real_fit = training.fit

    def fit_failing_fold_1(loop, files, **kw):
        if files.out.name == "fold-1":
            raise RuntimeError("simulated out of memory")
        return real_fit(loop, files, **kw)

    monkeypatch.setattr(training, "fit", fit_failing_fold_1)
    assert cli.main(["cv", str(food11_tiny), "--folds", "3", "--out", str(out), *FAST]) == 1
    printed = capsys.readouterr().out
    assert "fold 1: FAILED" in printed and "--fold 1" in printed
    assert rundir.is_done(out / "fold-0") and rundir.is_done(out / "fold-2") and not rundir.is_done(out / "fold-1")
    assert not (out / "cv.json").exists()
    fold0_weights = (out / "fold-0" / "best.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(training, "fit", real_fit)
    assert cli.main(["cv", str(food11_tiny), "--out", str(out), "--fold", "1"]) == 0  # settings from DIR/config.yaml
    printed = capsys.readouterr().out
    assert "out-of-fold acc" in printed
    assert (out / "fold-0" / "best.safetensors").stat().st_mtime_ns == fold0_weights  # not retrained

    truth = labelled_ids(food11_tiny)
    for f in range(3):  # each fold is an ordinary run directory
        for name in ("config.yaml", "manifest.json", "metrics.jsonl", "best.safetensors", "submission.csv"):
            assert (out / f"fold-{f}" / name).is_file()
    oof = ensemble.load_probs(out / "oof.npz")
    assert len(oof.ids) == len(set(oof.ids)) == len(truth) == 33  # one row per labelled image
    assert set(oof.ids) == set(truth) and oof.classes == ["0", "1", "2"]
    assert [truth[i] for i in oof.ids] == oof.labels.tolist()
    summary = json.loads((out / "cv.json").read_text())
    assert [p["fold"] for p in summary["per_fold"]] == [0, 1, 2]
    assert sum(p["val_images"] for p in summary["per_fold"]) == 33
    assert summary["oof_acc"] == pytest.approx(float((oof.probs.argmax(1).numpy() == oof.labels).mean()))
    accs = [p["acc"] for p in summary["per_fold"]]
    assert summary["fold_acc"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["fold_acc"]["std"] == pytest.approx(np.std(accs, ddof=1))
    rows = read_csv(out / "submission.csv")
    assert rows[0] == ["Id", "Category"] and [r[0] for r in rows[1:]] == ["0001", "0002", "0003", "0004", "0005"]

    # The cv directory as one ensemble member: its folds' models give the same submission, and the
    # held-out accuracy printed is the out-of-fold accuracy.
    again = tmp_path / "again.csv"
    assert cli.main(["predict", str(out), "--data", str(food11_tiny), "--out", str(again), "--device", "cpu"]) == 0
    assert read_csv(again) == rows
    assert f"{summary['oof_acc']:.4f}  {out} (out-of-fold, 3 folds)" in capsys.readouterr().out

    # A rerun that changes what is learned is refused; a finished cv is not retrained.
    assert cli.main(["cv", str(food11_tiny), "--out", str(out), "epochs=3"]) == 1
    assert "other settings" in capsys.readouterr().err
    assert cli.main(["cv", str(food11_tiny), "--out", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (out / "fold-0" / "best.safetensors").stat().st_mtime_ns == fold0_weights


# --- ensembles ----------------------------------------------------------------------------------

def test_vote_breaks_ties_by_summed_probability():
    a = torch.tensor([[0.41, 0.20, 0.39],   # votes 0
                      [0.50, 0.40, 0.10]])  # votes 0
    b = torch.tensor([[0.19, 0.42, 0.39],   # votes 1: tie 0-1; sums 0.60 / 0.62 / 0.78 -> 1 (2 got no vote)
                      [0.10, 0.45, 0.45]])  # votes 1: tie 0-1; sums 0.60 / 0.85 -> 1
    _, preds = ensemble.ensemble([a, b], method="vote")
    assert preds.tolist() == [1, 1]
    c = torch.tensor([[0.90, 0.05, 0.05], [0.90, 0.05, 0.05]])  # votes 0 with a large margin
    _, preds = ensemble.ensemble([b, b, c], method="vote")
    assert preds.tolist() == [1, 1]  # the majority wins over the summed probability (c's 0.9)
    _, preds = ensemble.ensemble([a, b], method="vote", weights=[2, 1])
    assert preds.tolist() == [0, 0]  # weighted votes
    _, preds = ensemble.ensemble([a, b], method="vote", weights=[0.1 + 0.2, 0.3])  # a float tie is still a tie
    assert preds.tolist() == [1, 1]


@pytest.mark.parametrize("method", ["mean", "logits", "vote"])
def test_an_ensemble_of_one_equals_that_member(method):
    probs = torch.softmax(torch.randn(50, 7, generator=torch.Generator().manual_seed(0)), 1)
    scores, preds = ensemble.ensemble([probs], method=method)
    assert preds.tolist() == probs.argmax(1).tolist()
    if method != "vote":
        torch.testing.assert_close(scores, probs)


def test_predict_with_one_run_and_any_ensemble_equals_the_runs_submission(food11_tiny, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST]) == 0
    for method in ("mean", "vote"):
        out = tmp_path / f"{method}.csv"
        assert cli.main(["predict", str(run), "--data", str(food11_tiny), "--out", str(out), "--device", "cpu",
                         "--ensemble", method]) == 0
        assert read_csv(out) == read_csv(run / "submission.csv")
    saved = ensemble.load_probs(tmp_path / "mean.probs.npz")
    trained = ensemble.load_probs(run / "test_logits.npz").take(saved.ids)
    torch.testing.assert_close(saved.probs, trained.probs)


def test_ids_survive_shuffles(tmp_path):
    gen = torch.Generator().manual_seed(1)
    ids = [f"img_{k}" for k in range(20)]
    labels = np.arange(20) % 4
    a = ensemble.Probs(ids, ["w", "x", "y", "z"], torch.softmax(torch.randn(20, 4, generator=gen), 1), labels=labels)
    b = ensemble.Probs(ids, a.classes, torch.softmax(torch.randn(20, 4, generator=gen), 1), labels=labels)
    perm = np.random.default_rng(0).permutation(20)
    shuffled = ensemble.Probs([ids[i] for i in perm], a.classes, b.probs[perm], labels=labels[perm])
    shuffled.save(tmp_path / "shuffled.npz")
    loaded = ensemble.load_probs(tmp_path / "shuffled.npz")
    assert loaded.ids != ids
    torch.testing.assert_close(loaded.take(ids).probs, b.probs)
    np.testing.assert_array_equal(loaded.take(ids).labels, labels)
    assert ensemble.heldout_accuracy([a, loaded]) == ensemble.heldout_accuracy([a, b])
    with pytest.raises(cli.UserError, match="have no prediction"):
        a.take(ids + ["img_unknown"])


# --- test-time augmentation ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model_and_images():
    torch.manual_seed(0)
    model = create_model("tinycnn", 5, width=8).eval()
    images = torch.randint(0, 256, (12, 20, 20, 3), dtype=torch.uint8)
    return model, images, np.arange(12)


@pytest.mark.parametrize("views", ["fixed", "aug"])
def test_tta_with_weight_1_equals_plain_prediction(small_model_and_images, views):
    from imgcls.config import AugConfig

    model, images, rows = small_model_and_images
    plain = inference.infer(model, images, rows, size=16, hw=CPU).softmax(1)
    kw = dict(size=16, hw=CPU, n=4, views=views, aug=AugConfig(), seed=0)
    torch.testing.assert_close(inference.tta_probs(model, images, rows, weight=1.0, **kw), plain, rtol=0, atol=0)
    assert not torch.allclose(inference.tta_probs(model, images, rows, weight=0.5, **kw), plain)  # the views count
    torch.testing.assert_close(inference.tta_probs(model, images, rows, n=0, size=16, hw=CPU), plain)


def test_fixed_views_are_flips_and_shifted_crops_and_aug_views_are_seeded(small_model_and_images):
    from imgcls import augment
    from imgcls.config import AugConfig

    model, images, rows = small_model_and_images
    flipped = inference.infer(model, images, rows, size=16, hw=CPU,
                            view=lambda x: augment.eval_views(x, size=16).flip(-1)).softmax(1)
    only_flip = inference.tta_probs(model, images, rows, size=16, hw=CPU, n=1, weight=0.0, views="fixed")
    torch.testing.assert_close(only_flip, flipped)
    crop = inference.fixed_view(images, size=16, crop="bottom_right", flip=False)
    torch.testing.assert_close(crop, augment.normalize(augment.resize(augment.to_float(images)[..., 2:, 2:], 16)))  # 87.5% of 20 px
    with pytest.raises(cli.UserError, match="fixed views"):
        inference.tta_probs(model, images, rows, size=16, hw=CPU, n=12)
    kw = dict(size=16, hw=CPU, n=3, weight=0.0, views="aug", aug=AugConfig())
    torch.testing.assert_close(inference.tta_probs(model, images, rows, seed=5, **kw),
                               inference.tta_probs(model, images, rows, seed=5, **kw))
    assert not torch.allclose(inference.tta_probs(model, images, rows, seed=5, **kw),
                              inference.tta_probs(model, images, rows, seed=6, **kw))


# --- seeded repeats and the GPU job runner ------------------------------------------------------

def test_seeds_train_one_run_per_seed_and_summarize(food11_tiny, tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli.main(["train", str(food11_tiny), "--out", str(out), *FAST, "seeds=1,2"]) == 0
    assert "+-" in capsys.readouterr().out
    summary = json.loads((out / "seeds.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [1, 2]
    finals = []
    for s in (1, 2):
        manifest = json.loads((out / f"seed-{s}" / "manifest.json").read_text())
        assert manifest["seed"] == s and (out / f"seed-{s}" / "submission.csv").is_file()
        finals.append(json.loads((out / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()[-1])["val_acc"])
    assert summary["final_val_acc"]["mean"] == pytest.approx(np.mean(finals))
    assert summary["final_val_acc"]["std"] == pytest.approx(np.std(finals, ddof=1))
    before = (out / "seed-1" / "best.safetensors").stat().st_mtime_ns
    assert cli.main(["train", str(food11_tiny), "--out", str(out), *FAST, "seeds=1,2"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (out / "seed-1" / "best.safetensors").stat().st_mtime_ns == before


def test_run_parallel_gives_each_job_its_own_gpu_and_reports_failures(tmp_path):
    code = "import os, sys, time; print('gpu', os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(0.3); sys.exit({})"
    commands = [([sys.executable, "-c", code.format(k == 2)], tmp_path / f"job{k}" / "log.txt") for k in range(4)]
    started = []
    codes = jobs.run_parallel(commands, ["3", "5"], on_start=lambda i, gpu: started.append((i, gpu)), poll_seconds=0.05)
    assert codes == [0, 0, 1, 0]  # the failed job is reported; the others still ran
    assert [i for i, _ in started] == [0, 1, 2, 3] and {g for _, g in started[:2]} == {"3", "5"}
    for i, gpu in started:
        assert (tmp_path / f"job{i}" / "log.txt").read_text().strip() == f"gpu {gpu}"


def test_folds_and_seeds_run_as_one_child_process_per_gpu(food11_tiny, tmp_path, monkeypatch, capsys):
    """The multi-GPU path end to end, with two pretend GPUs: the children see no CUDA device and train
    on the CPU, but are started, logged and collected exactly as on a GPU machine."""
    monkeypatch.setattr(jobs, "visible_gpus", lambda: ["0", "1"])
    settings = [s for s in FAST if not s.startswith("device=")]  # device=auto: cpu would mean sequential
    out = tmp_path / "cv"
    assert cli.main(["cv", str(food11_tiny), "--folds", "3", "--out", str(out), *settings]) == 0
    printed = capsys.readouterr().out
    assert "fold 0: started on GPU 0" in printed and "fold 1: started on GPU 1" in printed
    assert all(rundir.is_done(out / f"fold-{f}") and (out / f"fold-{f}" / "log.txt").is_file() for f in range(3))
    assert len(ensemble.load_probs(out / "oof.npz").ids) == 33
    rep = tmp_path / "rep"
    assert cli.main(["train", str(food11_tiny), "--out", str(rep), *settings, "seeds=4,5"]) == 0
    summary = json.loads((rep / "seeds.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["done", "done"]
    assert json.loads((rep / "seed-5" / "manifest.json").read_text())["seed"] == 5


def test_eval_crop_scores_the_centre_and_tta_flips_that_same_view(small_model_and_images):
    from imgcls import augment, config

    model, images, rows = small_model_and_images
    centre = augment.eval_views(images, size=16, crop=0.8)  # 16 of 20 px, 2 px off each side
    torch.testing.assert_close(centre, augment.normalize(augment.to_float(images)[..., 2:18, 2:18]))
    plain = inference.infer(model, images, rows, size=16, hw=CPU, crop=0.8).softmax(1)
    assert not torch.allclose(plain, inference.infer(model, images, rows, size=16, hw=CPU).softmax(1))
    flipped = inference.infer(model, images, rows, size=16, hw=CPU,
                              view=lambda x: augment.eval_views(x, size=16, crop=0.8).flip(-1)).softmax(1)
    only_flip = inference.tta_probs(model, images, rows, size=16, hw=CPU, n=1, weight=0.0, crop=0.8)
    torch.testing.assert_close(only_flip, flipped)
    torch.testing.assert_close(inference.tta_probs(model, images, rows, size=16, hw=CPU, crop=0.8), plain)
    with pytest.raises(cli.UserError, match="eval_crop"):
        config.resolve(overrides={"eval_crop": "0"})
