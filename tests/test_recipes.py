"""The recipe (issue 15): models for the sizes users train at, optimizers and schedules, progressive
resizing, presets that never override what the user set, and `imgcls models`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import imgcls

from conftest import FAST, write_image
from imgcls import cli, config, optim, recipes
from imgcls.models import create_model
from imgcls.models.profile import forward_gflops


def test_resnet_d_family_downsamples_in_the_stem_and_starts_each_block_as_identity():
    for name in ("resnet18d", "resnet26d", "resnet34d", "resnet50d"):
        model = create_model(name, 7)
        assert model(torch.zeros(2, 3, 96, 96)).shape == (2, 7)
        stem = [m for m in model.conv1.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(stem) == 3 and stem[0].stride == (2, 2)  # the deep stem, downsampling
        last_bns = [b.bn3 if hasattr(b, "bn3") else b.bn2 for layer in (model.layer1, model.layer4) for b in layer]
        assert all(torch.count_nonzero(bn.weight) == 0 for bn in last_bns)  # zero-init last BN per block
        assert isinstance(model.layer2[0].downsample[0], torch.nn.AvgPool2d)  # the D shortcut
    # FLOPs grow with the square of the side; the stride-4 stem costs a 16th of the small-input layout
    small, photo = create_model("resnet18s", 10), create_model("resnet18d", 10)
    assert forward_gflops(photo, 128) == pytest.approx(4 * forward_gflops(photo, 64), rel=0.05)
    assert forward_gflops(small, 64) > 10 * forward_gflops(photo, 64)
    assert create_model("resnet18d", 10, width=32)(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_model_auto_chooses_by_image_size_and_aug_auto_by_epochs():
    assert config.resolve(overrides={"model": "auto", "image_size": 64}).model.model == recipes.model_for(64)
    assert config.resolve(overrides={"model": "auto", "image_size": 160}).model.model == recipes.model_for(160)
    short = config.resolve(overrides={"aug": "auto", "epochs": 5})
    mid = config.resolve(overrides={"aug": "auto", "epochs": 6})
    long = config.resolve(overrides={"aug": "auto", "epochs": 200})
    assert (short.aug.aug, short.aug.policy, short.aug.mixup_alpha, short.aug.crop_scale) == ("short", "none", 0.0, (0.6, 1.0))
    assert (mid.aug.aug, mid.aug.crop_scale) == ("light", (0.35, 1.0))  # larger crops for 5 epochs or fewer only
    kept = config.resolve(overrides={"aug": "auto", "epochs": 5, "crop_scale": "0.2,1"})
    assert kept.aug.aug == "short" and kept.aug.crop_scale == (0.2, 1.0)  # what the user set stays
    assert (long.aug.aug, long.aug.policy) == ("strong", "trivialaugment") and long.aug.mixup_alpha > 0


def test_aug_auto_mixes_from_41_to_80_epochs_as_strong_mixes_and_keeps_a_users_mixing_keys():
    """Mixing won at 80 epochs (3 seeds) and did not at 40 (5 seeds): medium to 40, medium + strong's mixing to 80."""
    at = {e: config.resolve(overrides={"aug": "auto", "epochs": e}).aug for e in (40, 41, 80, 81)}
    assert [at[e].aug for e in at] == ["medium", "medium-mix", "medium-mix", "strong"]
    mixing = ("mixup_alpha", "cutmix_alpha", "mix_prob", "mix_mode")
    assert [getattr(at[40], k) for k in mixing] == [0.0, 0.0, 1.0, "batch"]  # medium: no mixing
    assert [getattr(at[80], k) for k in mixing] == [getattr(at[81], k) for k in mixing] == [0.2, 1.0, 0.8, "sample"]
    for key in ("crop_scale", "brightness", "contrast", "saturation", "policy", "erasing"):
        assert getattr(at[80], key) == getattr(at[40], key)  # the rest is medium's
    kept = config.resolve(overrides={"aug": "auto", "epochs": 60, "mixup_alpha": 0, "cutmix_alpha": 0})
    assert (kept.aug.aug, kept.aug.mixup_alpha, kept.aug.cutmix_alpha, kept.aug.brightness) == ("medium-mix", 0, 0, 0.2)


def test_an_imagefolder_trains_at_the_size_of_the_layout_its_photos_are_like(tmp_path, food11_tiny):
    photos, thumbs = tmp_path / "photos", tmp_path / "thumbs"
    for i in range(5):  # photos of 160-200 px short side (one odd one of 90) and 64-px thumbnails
        write_image(photos / "train" / f"c{i % 2}" / f"{i}.jpg", size=(240, 90 if i == 4 else 160 + 10 * i), fmt="JPEG")
        write_image(thumbs / "train" / f"c{i % 2}" / f"{i}.png", size=(64, 64))
    (photos / "train" / "c0" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped here, reported by the cache
    assert config.for_data(photos).cfg.data.image_size == 128  # food-11's measured size, not 64 for photos
    assert config.for_data(thumbs).cfg.data.image_size == 64  # tiny-imagenet's, never upscaled to 128
    assert config.for_data(photos, overrides={"image_size": 96}).cfg.data.image_size == 96  # the user's wins
    assert config.for_data(food11_tiny).cfg.data.image_size == 128  # the named layouts keep their sizes

def test_presets_and_optimizer_defaults_never_override_what_the_user_set(tmp_path):
    cfg = config.resolve(overrides={"aug": "strong", "hflip": 0, "optimizer": "adamw", "weight_decay": 0.1})
    assert cfg.aug.hflip == 0 and cfg.aug.policy == "trivialaugment"  # the preset fills the rest
    assert cfg.optim.weight_decay == 0.1 and cfg.optim.lr == recipes.OPTIMIZERS["adamw"].lr
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml(cfg))
    again = config.resolve(file=saved, overrides={"epochs": 3})  # a resume or rerun trains the same
    assert again.to_dict() == {**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "epochs": 3}}


@pytest.mark.parametrize("name", sorted(recipes.OPTIMIZERS))
def test_every_optimizer_builds_and_steps_with_decay_only_on_weights(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    cfg = config.resolve(overrides={"optimizer": name}).optim
    opt = optim.build_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, cfg.weight_decay]
    assert all(p.ndim > 1 for g in opt.param_groups if g["weight_decay"] for p in g["params"])
    options = recipes.OPTIMIZERS[name].options  # e.g. Muon's ns_steps
    assert all(g[key] == value for g in opt.param_groups for key, value in options.items())


@pytest.mark.parametrize("schedule", ["cosine", "flat_cos", "linear", "onecycle"])
def test_schedules_rise_to_the_peak_and_decay_to_the_floor(schedule):
    cfg = config.resolve(overrides={"schedule": schedule}).optim
    lrs = [optim.lr_at(s, total=200, warmup=20, peak=1.0, cfg=cfg) for s in range(200)]
    assert max(lrs) == pytest.approx(1.0, rel=0.02) and lrs[-1] < 0.01 and lrs[0] < 0.1
    peak_at = lrs.index(max(lrs))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[peak_at:], lrs[peak_at + 1:]))  # no rise after the peak
    if schedule == "flat_cos":
        flat_until = 20 + round(cfg.decay_start * 180)
        assert min(lrs[20:flat_until]) == pytest.approx(1.0)


def test_a_run_shorter_than_its_warmup_still_decays():
    """warmup_epochs=1 in a 1-epoch run: the warmup is cut to a fifth of the run, so the run ends annealed."""
    cfg = config.resolve().optim
    lrs = [optim.lr_at(s, total=100, warmup=100, peak=1.0, cfg=cfg) for s in range(100)]
    assert lrs[19] == pytest.approx(1.0) and lrs[-1] < 0.01
    assert optim.lr_at(10, total=1000, warmup=100, peak=1.0, cfg=cfg) == pytest.approx(0.11)  # a long run: unchanged


def test_progressive_resizing_ends_at_full_size():
    sizes = [optim.size_at(e, epochs=10, size=128, scale=0.5, end=0.75) for e in range(10)]
    assert sizes[0] == 64 and sizes[7] < 128 and sizes[8:] == [128, 128] and sizes == sorted(sizes)  # full from 3/4 on
    assert all(s % 16 == 0 for s in sizes)
    assert [optim.size_at(e, epochs=10, size=128, scale=1.0, end=0.75) for e in range(10)] == [128] * 10


def test_ema_auto_spans_a_tenth_of_the_run():
    assert 1 / (1 - optim.ema_decay("auto", 500)) == pytest.approx(50)
    assert optim.ema_decay(0.999, 500) == 0.999 and optim.ema_decay(0.0, 500) == 0.0


def test_a_run_with_progressive_resizing_and_eval_size_trains_and_scores_at_its_sizes(food11_tiny, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", str(food11_tiny), "--out", str(run), *FAST, "image_size=64", "eval_size=72",
                     "prog_scale=0.5", "epochs=4", "ema=auto", "optimizer=lamb"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["image_size"] for r in rows] == [32, 32, 48, 64]  # multiples of 16 up to full size at 3/4 of the run
    assert config.cache_size(config.resolve(file=run / "config.yaml").data) == 72


def test_models_lists_parameters_flops_and_measured_speed(capsys):
    assert cli.main(["models", "--sizes", "32", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet18d", "resnet26d", "resnet18s", "tinycnn"):
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        params, gflops, speed = line.split()[1:4]
        assert params.endswith("M") and float(gflops) > 0 and float(speed) > 0
    assert "model=auto" in out
    assert "batch 4 at 32 px" in out


def test_models_times_each_size_at_a_runs_batch_unless_given_one(monkeypatch, capsys):
    from imgcls.models import profile

    timed = []
    monkeypatch.setattr(profile, "train_speed", lambda model, size, *, hw, batch: timed.append((size, batch)) or 1.0)
    assert cli.main(["models", "--sizes", "64,128"]) == 0
    assert set(timed) == {(64, recipes.batch_for(64)), (128, recipes.batch_for(128))} and recipes.batch_for(64) == 64
    assert "batch 64 at 64 px, 32 at 128 px" in capsys.readouterr().out


@pytest.mark.parametrize("preset", [None, "food11", "tiny-imagenet", "food11-light", "food11-strong",
                                    "tiny-imagenet-light", "tiny-imagenet-strong"])
def test_no_flags_and_the_shipped_presets_train_with_the_recipe(preset):
    """`imgcls train DATA` and `--config <preset>` both get the measured recipe (issue 15)."""
    cfg = config.resolve(file=preset)
    size = cfg.data.image_size
    optimizer = "muon" if preset in (None, "food11", "tiny-imagenet") else "lamb"  # measured there
    assert (cfg.optim.optimizer, cfg.optim.schedule, cfg.optim.ema) == (optimizer, "flat_cos", "auto")
    assert cfg.optim.lr == recipes.OPTIMIZERS[optimizer].lr
    assert cfg.optim.weight_decay == recipes.OPTIMIZERS[optimizer].weight_decay
    assert cfg.model.model == recipes.model_for(size) and cfg.data.resize == "center_crop"
    named = preset and preset.split("-")[-1].removesuffix(".yaml")  # food11-strong.yaml: the strong preset
    assert cfg.aug.aug == (named if named in ("light", "strong") else recipes.aug_for(cfg.run.epochs))
    assert recipes.model_for(32) == "resnet18s2" and recipes.model_for(64) == "resnet18d"  # stride 2 below 64 px


def test_batch_size_follows_the_image_size_unless_given():
    """64 at 64 px (Muon's step would cost more than the model's at 32), 32 at 128 px and below 64; a batch
    from the user, a layout's defaults or a preset file is kept."""
    assert [config.resolve(overrides=[f"image_size={s}"]).run.batch_size for s in (32, 64, 95, 96, 128)] == [32, 64, 64, 32, 32]
    assert config.resolve(overrides=["image_size=64", "batch_size=16"]).run.batch_size == 16
    assert config.resolve(defaults={"image_size": 64, "batch_size": 8}).run.batch_size == 8
    assert config.resolve(file="food11", overrides=["image_size=64"]).run.batch_size == 32  # the preset's own


def import_sweep():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    return sweep


def test_a_sweep_on_the_first_classes_of_a_food11_folder_keeps_every_image(food11_tiny, tmp_path):
    """--classes on the food-11 layout: training/0_0.jpg and validation/0_0.jpg share a name (the view
    once stopped at FileExistsError); each is linked once, with its label, train and val apart."""
    from imgcls import layouts

    view = import_sweep().subset_view(food11_tiny, tmp_path, classes=2, held_out=0.25)
    ds = layouts.read(view)
    assert ds.counts() == {"train": 16, "val": 6}  # 2 classes x (8 + 3) labelled images, 25% held out
    linked = sorted(str(s.path.resolve()) for split in ("train", "val") for s in ds.splits[split])
    originals = sorted(str(p.resolve()) for folder in ("training", "validation")
                       for p in (food11_tiny / folder).glob("[01]_*.jpg"))
    assert linked == originals
    assert all(s.label == int(s.path.resolve().name.split("_")[0]) for split in ("train", "val") for s in ds.splits[split])


def test_a_sweep_records_only_runs_that_finished(food11_tiny, tmp_path, capsys):
    """A run cut short (a signal, or here time_limit=) is no result: the sweep ends there, without its row."""
    sweep = import_sweep()
    log = tmp_path / "sweep.jsonl"
    base = " ".join(s for s in FAST if not s.startswith("epochs="))
    rc = sweep.main(["--data", str(food11_tiny), "--epochs", "2", "--base", base, "--json", str(log),
                     "--arm", "whole", "", "--arm", "cut", "time_limit=1s", "--arm", "after", ""])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rc == 1 and [(r["arm"], len(r["curve"])) for r in rows] == [("whole", 2)]
    out = capsys.readouterr().out
    assert "cut seed 0: stopped (time_limit)" in out and "after seed" not in out


def test_a_sweep_scores_other_ema_lengths_from_the_same_run(food11_tiny, tmp_path, capsys):
    """--ema-shares: averages over other shares of the steps, fed at every step the run's own EMA is, scored
    after the run on its view. The run's own average scores what the run's last epoch did, also when it ended
    below its best (finish() has loaded the best weights into it), and nothing is left patched."""
    sweep = import_sweep()
    build = optim.build_ema
    with sweep.Averages([0, 0.2, 0.5]) as averages:
        result = imgcls.train(food11_tiny, tmp_path / "run", **{**dict(s.split("=") for s in FAST), "seed": 2, "amp": "off"})
    assert optim.build_ema is build
    assert result.final_val_acc < result.best_val_acc, "this seed's run must end below its best for the test to mean anything"
    short, longer, raw = averages.models[0.2], averages.models[0.5], averages.models[0.0]
    assert int(longer.n_averaged) == len(result.metrics) * 3  # every step: 24 images, batch 8

    def differ(a, b) -> bool:
        return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    assert differ(longer.module, raw) and differ(longer.module, short.module)  # no warm-up cap makes them one
    scores = averages.score(tmp_path / "run", food11_tiny)
    assert sorted(scores) == [0.0, optim.EMA_SHARE, 0.2, 0.5] and scores[optim.EMA_SHARE] == result.final_val_acc

    log = tmp_path / "sweep.jsonl"
    base = " ".join(s for s in FAST if not s.startswith("epochs="))
    assert sweep.main(["--data", str(food11_tiny), "--epochs", "2", "--base", base, "--json", str(log),
                       "--ema-shares", "0,0.3", "--arm", "a", "", "--seeds", "0,1"]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [sorted(r["at_ema"]) for r in rows] == [["0.0", "0.1", "0.3"]] * 2
    assert all(r["at_ema"]["0.1"] == r["final"] for r in rows)
    assert "ema share 0.3" in capsys.readouterr().out


def test_a_sweep_table_pairs_every_arm_with_the_first_by_seed(tmp_path, capsys):
    """The table a default change rests on: later arms against the first, seed by seed (seeds the first arm
    lacks are left out of the pairing), read back from --json files of earlier sweeps without training."""
    sweep = import_sweep()
    row = dict(settings="", base="", data="d", wall=10.0, best=0.0, curve=[], model="m")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text("".join(json.dumps({**row, "arm": "default", "epochs": 20, "seed": s, "final": f}) + "\n"
                           for s, f in [(0, 0.70), (1, 0.60)]))
    two.write_text("".join(json.dumps({**row, "arm": arm, "epochs": 20, "seed": s, "final": f,
                                       "at_ema": {"0.0": f - 0.01, "0.1": f}}) + "\n"
                           for arm, s, f in [("new", 0, 0.74), ("new", 1, 0.62), ("new", 2, 0.99)]))
    table = sweep.saved_table([one, two])
    assert [(name, [r["seed"] for r in runs]) for name, _, runs in table] == [("default", [0, 1]), ("new", [0, 1, 2])]
    assert sweep.main(["--table", str(one), str(two)]) == 0
    lines = capsys.readouterr().out.splitlines()
    new = next(line for line in lines if line.startswith("new "))
    assert "paired vs default" in lines[0] and "+0.0300 +- 0.0100" in new  # (+0.04, +0.02); seed 2 unpaired
    assert next(line for line in lines if line.startswith("default ")).count("+-") == 1  # no pairing with itself
    assert any("ema share 0.0" in line and "paired -0.0100" in line for line in lines)
    with pytest.raises(SystemExit):  # training needs its arguments
        sweep.main(["--epochs", "2"])
