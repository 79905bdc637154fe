"""The report: plots, per_class.csv and one self-contained report.html for runs and cv directories."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, REPO
from imgcls import cli, ensemble, reporting


@pytest.fixture(scope="module")
def food_run(food10_slice, tmp_path_factory):
    """One finished food-10 slice run (its report is written by `imgcls train` itself)."""
    run = tmp_path_factory.mktemp("report") / "run"
    assert cli.main(["train", str(food10_slice), "--out", str(run), *FAST, "image_size=32", "epochs=2"]) == 0
    return run


def sources(page: str) -> list[str]:
    """Every src=/href= value and every CSS url(...) in the page."""
    attrs = re.findall(r"""\b(?:src|href|srcset|poster|data)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.I)
    return attrs + re.findall(r"url\(\s*['\"]?([^'\")]*)", page, flags=re.I)


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_train_writes_every_report_file(food_run):
    for name in ("curves.png", "confusion.png", "per_class.csv", "per_class.png", "mistakes.png", "preview.png",
                 "report.html"):
        assert (food_run / name).is_file() and (food_run / name).stat().st_size > 0, name
        if name.endswith(".png"):
            with Image.open(food_run / name) as im:
                im.verify()


def test_html_embeds_every_image_and_references_nothing_outside(food_run):
    page = (food_run / "report.html").read_text()
    refs = sources(page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), [r[:40] for r in refs]
    assert "http://" not in page and "https://" not in page and "file:" not in page
    # each plot is in the page byte for byte, as written beside it
    pngs = embedded_pngs(page)
    for name in ("curves.png", "confusion.png", "per_class.png", "mistakes.png", "preview.png"):
        assert (food_run / name).read_bytes() in pngs, name
    # config, manifest and the key figures are in the page
    assert "model: tinycnn" in page
    shown = [json.loads(html.unescape(t)) for t in re.findall(r"<pre>(.*?)</pre>", page, flags=re.S)]
    assert json.loads((food_run / "manifest.json").read_text()) in shown
    val = ensemble.load_probs(food_run / "val_logits.npz")
    acc = float((val.probs.argmax(1).numpy() == val.labels).mean())
    assert f"{acc:.4f} on {len(val.ids)} images" in page


def test_confusion_rows_sum_to_the_per_class_counts(food_run):
    written = reporting.write(food_run)
    val = ensemble.load_probs(food_run / "val_logits.npz")
    counts = written.confusion
    assert counts.shape == (10, 10)
    np.testing.assert_array_equal(counts.sum(1), np.bincount(val.labels, minlength=10))
    np.testing.assert_array_equal(np.diag(counts), [((val.probs.argmax(1).numpy() == val.labels) & (val.labels == c)).sum()
                                                    for c in range(10)])
    with open(food_run / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == val.classes
    assert [int(r["images"]) for r in rows] == counts.sum(1).tolist() == [4] * 10  # the slice: 4 val images a class
    assert [int(r["correct"]) for r in rows] == np.diag(counts).tolist()
    for r in rows:
        assert float(r["accuracy"]) == pytest.approx(int(r["correct"]) / int(r["images"]), abs=1e-4)


def test_confusion_matrix_and_confident_mistakes_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.9, .1, 0], [.2, .7, .1], [0, 1, 0], [.6, .4, 0], [0, .05, .95], [.1, .1, .8]])
    counts = reporting.confusion_matrix(labels, probs.argmax(1), 3)
    np.testing.assert_array_equal(counts, [[1, 1, 0], [1, 1, 0], [0, 0, 2]])
    assert reporting.confident_mistakes(probs, labels, 5).tolist() == [1, 3]  # 0.7 wrong, then 0.6 wrong
    rows = reporting.per_class_rows(counts, ["a", "b", "c"])
    assert rows[2] == {"class": "c", "images": 2, "correct": 2, "accuracy": 1.0}


def test_confusion_for_100_classes_grows_to_stay_readable():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 3)
    counts = reporting.confusion_matrix(labels, rng.integers(0, 100, len(labels)), 100)
    with Image.open(io.BytesIO(reporting.plot_confusion(counts, [f"class_{i}" for i in range(100)]))) as im:
        assert min(im.size) >= 100 * 20  # at least 20 px per class on each axis (7 pt names fit)


def test_report_without_the_dataset_skips_mistakes_with_a_note(food_run, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(food_run, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["data"]["root"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    assert cli.main(["report", str(moved)]) == 0
    out = capsys.readouterr().out
    assert "is not there" in out and "report.html" in out
    assert not (moved / "mistakes.png").exists() and not (moved / "preview.png").exists()  # stale copies removed
    page = (moved / "report.html").read_text()
    assert "Most confident mistakes" in page and "is not there" in page
    assert all(r.startswith("data:") for r in sources(page))


def test_report_of_an_unfinished_run_has_curves_and_says_why_not_more(food_run, tmp_path):
    run = tmp_path / "unfinished"
    shutil.copytree(food_run, run)
    (run / "val_logits.npz").unlink()
    written = reporting.write(run)
    assert written.confusion is None and (run / "curves.png").is_file()
    assert not (run / "confusion.png").exists() and not (run / "per_class.csv").exists()
    assert "has not finished" in (run / "report.html").read_text()


def test_report_of_a_folder_that_is_no_run_is_a_user_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "neither a run directory" in capsys.readouterr().err


def test_a_failing_report_warns_and_keeps_the_run(food11_tiny, tmp_path, monkeypatch, capsys):
    def broken(path):
        raise RuntimeError("no fonts today")
    monkeypatch.setattr(reporting, "write", broken)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"the report could not be written \(RuntimeError: no fonts today\)"):
        assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST]) == 0  # the API warns
    assert "the report could not be written (RuntimeError: no fonts today)" in capsys.readouterr().err  # the CLI says
    assert (run / "submission.csv").is_file() and (run / "best.safetensors").is_file()


def test_cv_report_has_the_fold_table(food11_tiny, tmp_path):
    out = tmp_path / "cv"
    assert cli.main(["cv", str(food11_tiny), "--folds", "2", "--out", str(out), *FAST]) == 0
    cv = json.loads((out / "cv.json").read_text())
    page = (out / "report.html").read_text()
    assert "<h2>Folds (2, seed 0)</h2>" in page
    for p in cv["per_fold"]:
        assert f"<td>{p['run']}</td><td>{p['val_images']}</td><td>{p['acc']:.4f}</td>" in page
    fa = cv["fold_acc"]
    assert f"<td>mean ± std</td><td></td><td>{cv['labelled_images']}</td><td>{fa['mean']:.4f} ± {fa['std']:.4f}</td>" in page
    counts = reporting.write(out).confusion  # from the out-of-fold predictions: every labelled image once
    assert counts.sum() == cv["labelled_images"] == 33
    np.testing.assert_array_equal(counts.sum(1), [11, 11, 11])
    assert all(r.startswith("data:") for r in sources(page))
    assert (out / "curves.png").is_file() and (out / "mistakes.png").exists() == (counts.trace() < counts.sum())


def test_tensorboard_missing_is_a_user_error(food11_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "r"), *FAST, "tensorboard=true"]) == 1
    assert "pip install tensorboard" in capsys.readouterr().err


def test_tensorboard_logs_the_epoch_scalars(food11_tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, "epochs=3", "tensorboard=true"]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("accuracy/val", "val_acc"), ("loss/train", "train_loss"), ("lr", "lr")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx([m[key] for m in metrics], rel=1e-6)


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Chromium (apt-get install chromium)")
def test_screenshot_script_renders_the_report(food_run, tmp_path):
    out = tmp_path / "shot.png"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "screenshot_report.py"), str(food_run), "--out", str(out),
                    "--height", "900"], check=True, timeout=120)
    with Image.open(out) as im:
        assert im.size == (1280, 900)
        grey = np.asarray(im.convert("L"), dtype=np.float32)
    assert grey.std() > 20  # text, tables and plots, not a blank page
