"""The spine end to end: layouts, cache, training, run directory, submission."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import FAST
from imgcls import cache, cli, layouts


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_food10_layout_labels_and_ids(food10_slice):
    ds = layouts.read(food10_slice)
    assert ds.layout == "food-11"
    assert ds.classes[:3] == ["apple_pie", "baby_back_ribs", "baklava"]
    assert {s.label for s in ds.splits["train"]} == set(range(10))
    for s in ds.splits["train"]:
        assert s.path.name.startswith(f"{s.label}_")  # label from the file name, not folder order
    assert sorted(s.id for s in ds.splits["test"])[:2] == ["0001", "0002"]  # stems kept exactly
    assert not ds.errors


def test_tiny_imagenet_label_is_wnids_line_not_sorted_order(tiny_slice):
    ds = layouts.read(tiny_slice)
    wnids = (tiny_slice / "wnids.txt").read_text().split()
    assert ds.layout == "tiny-imagenet" and ds.classes == wnids and wnids != sorted(wnids)
    for s in ds.splits["train"]:
        assert s.path.parent.parent.name == wnids[s.label]
    assert all(s.path.suffix == ".JPEG" for s in ds.splits["train"])  # *_boxes.txt ignored
    assert ds.template == [f"test_{k}.JPEG" for k in range(40)]


def test_cache_is_reused_then_rebuilt_when_a_file_changes(food11_tiny, tmp_path):
    paths = sorted((food11_tiny / "training").iterdir())
    first = cache.build(paths, size=16, cache_dir=tmp_path, progress=False)
    again = cache.build(paths, size=16, cache_dir=tmp_path, progress=False)
    assert first.built and not again.built and again.path == first.path
    assert first.images.shape == (len(paths), 16, 16, 3) and first.images.dtype == np.uint8
    np.testing.assert_array_equal(first.images, again.images)
    paths[0].write_bytes(paths[1].read_bytes())  # content, size and mtime change
    rebuilt = cache.build(paths, size=16, cache_dir=tmp_path, progress=False)
    assert rebuilt.built and rebuilt.path != first.path
    assert cache.build(paths, size=24, cache_dir=tmp_path, progress=False).built  # resize settings are in the key


def test_greyscale_food10_image_decodes_to_rgb(food10_slice):
    arr = cache.decode(food10_slice / "training" / "8_103.jpg", 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert (arr[..., 0] == arr[..., 1]).all()


def test_train_food10_slice_writes_run_directory_and_submission(food10_slice, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", str(food10_slice), "--out", str(run), *FAST, "image_size=32", "epochs=3"]) == 0
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "best.safetensors", "last.safetensors",
                 "submission.csv"):
        assert (run / name).is_file(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_acc", "lr", "seconds", "images_per_second"):
        assert key in metrics[0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["pretrained"] is False and manifest["data"]["layout"] == "food-11"
    assert manifest["data"]["images"] == {"train": 121, "val": 40, "test": 30}  # + the greyscale 8_103
    rows = read_csv(run / "submission.csv")
    assert rows[0] == ["Id", "Category"]
    assert [r[0] for r in rows[1:]] == [f"{k:04d}" for k in range(1, 31)]
    assert all(0 <= int(r[1]) < 10 for r in rows[1:])


def test_train_tiny_slice_fills_the_template(tiny_slice, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", str(tiny_slice), "--out", str(run), *FAST, "batch_size=32"]) == 0
    rows = read_csv(run / "submission.csv")
    assert rows[0] == ["image_id", "label"]
    assert [r[0] for r in rows[1:]] == [f"test_{k}.JPEG" for k in range(40)]
    assert all(0 <= int(r[1]) < 100 for r in rows[1:])


def test_predict_matches_the_submission_train_wrote(food11_tiny, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST]) == 0
    out = tmp_path / "again.csv"
    assert cli.main(["predict", str(run), "--data", str(food11_tiny), "--out", str(out), "--device", "cpu"]) == 0
    assert read_csv(out) == read_csv(run / "submission.csv")


@pytest.mark.parametrize("argv, fragment", [
    (["epochs=zero"], "expected an integer"),
    (["no_such_key=1"], "Unknown config key"),
    (["optimizer=adam"], "not one of"),
])
def test_bad_settings_exit_1_with_a_message(food11_tiny, tmp_path, capsys, argv, fragment):
    assert cli.main(["train", str(food11_tiny), "--out", str(tmp_path / "r"), *argv]) == 1
    assert fragment in capsys.readouterr().err


def test_demo_lays_out_digits_trains_and_writes_a_submission(tmp_path, capsys):
    """`imgcls demo` needs no user data; 3 epochs are enough to be far above chance (0.10)."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "epochs=3", "progress=false"]) == 0
    assert "demo: best val_acc" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(m["val_acc"] for m in metrics) > 0.5
    rows = read_csv(out / "run" / "submission.csv")
    assert rows[0] == ["Id", "Category"] and len(rows) - 1 == len(list((out / "data" / "test").iterdir()))


def test_ema_warms_up_so_a_short_run_does_not_evaluate_its_initial_weights():
    import torch
    from imgcls.optim import ema_update

    model = torch.nn.Linear(3, 3)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(0.999), use_buffers=True)
    ema.update_parameters(model)  # the first update copies the initial weights
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(100):
        ema.update_parameters(model)
    # decay min(0.999, (1 + n) / (10 + n)) keeps ~10% of the start after 100 steps; 0.999 would keep 90%
    assert torch.allclose(ema.module.weight, torch.ones(3, 3), atol=0.15)
