"""Issue 18, part 3: fine-tuning from a local pretrained file where the rules allow it. The 1000-class
file is made here from timm.create_model(pretrained=False): nothing is ever downloaded."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import imgcls
from conftest import FAST
from imgcls import augment, config, finetune, optim
from imgcls.models import create_model

SETTINGS = config.parse_overrides(FAST)
TIMM = {**SETTINGS, "model": "timm:resnet18", "image_size": 32, "batch_size": 32, "subset": 3}


@pytest.fixture(scope="module")
def imagenet_resnet18(tmp_path_factory) -> Path:
    """timm's resnet18 with its 1000-class classifier, as safetensors: what a new user would try."""
    import timm

    path = tmp_path_factory.mktemp("weights") / "resnet18-in1k.safetensors"
    model = timm.create_model("resnet18", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_init_with_a_1000_class_file_reinitialises_the_head_and_loads_the_rest(imagenet_resnet18, tiny_slice, tmp_path):
    run = tmp_path / "run"
    result = imgcls.train(tiny_slice, run, verbose=False, **{**TIMM, "epochs": 1, "freeze_epochs": 1,
                                                             "init": str(imagenet_resnet18)})
    manifest = json.loads((run / "manifest.json").read_text())
    pretrained = manifest["pretrained"]
    assert pretrained["path"] == str(imagenet_resnet18.resolve())
    assert pretrained["sha256"] == hashlib.sha256(imagenet_resnet18.read_bytes()).hexdigest()
    assert pretrained["head"] == ["fc"] and pretrained["reinitialised"] == ["fc.weight", "fc.bias"]
    assert pretrained["classes_in_file"] == 1000 and "food-11" in pretrained["note"]
    trained, source = load_file(str(run / "last.safetensors")), load_file(str(imagenet_resnet18))
    assert trained["fc.weight"].shape == (100, 512)
    # freeze_epochs=1 of 1: the backbone's weights are the file's, while the classifier trained
    for key in ("conv1.weight", "layer4.1.conv2.weight"):
        assert torch.equal(trained[key], source[key]), key
    assert result.submission and len(result.submission.read_text().splitlines()) == 41
    page = (run / "report.html").read_text()
    assert "PRETRAINED WEIGHTS" in page and "forbid pretrained weights" in page and "fc.weight, fc.bias" in page


def test_the_backbone_unfreezes_after_freeze_epochs_and_trains_at_lr_backbone(imagenet_resnet18, tiny_slice,
                                                                              tmp_path, capsys):
    from imgcls import cli

    run = tmp_path / "run"
    argv = [f"{k}={v}" for k, v in {**TIMM, "epochs": 2, "freeze_epochs": 1, "lr_backbone": 0.1,
                                    "init": imagenet_resnet18}.items()]
    assert cli.main(["train", str(tiny_slice), "--out", str(run), *argv]) == 0
    assert "the classifier (fc) is re-initialised: the file's has 1000 classes, this data 100" in capsys.readouterr().out
    trained, source = load_file(str(run / "last.safetensors")), load_file(str(imagenet_resnet18))
    assert not torch.equal(trained["conv1.weight"], source["conv1.weight"])  # epoch 2 trained the backbone


def test_lr_backbone_scales_every_parameter_but_the_classifiers():
    cfg = config.resolve(overrides={"lr_backbone": 0.1})
    model = create_model("resnet18s", 10)
    opt = optim.build_optimizer(model, cfg.optim)
    head = {id(p) for p in model.head[-1].parameters()}
    assert finetune.head_names(model) == ["head.3"]
    for group in opt.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1 and group["lr_scale"] == (1.0 if in_head == {True} else 0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    plain = optim.build_optimizer(model, config.resolve().optim)
    assert len(plain.param_groups) == 2  # without fine-tuning keys: the groups (and state.pt files) as before


def test_other_mismatches_are_still_refused(imagenet_resnet18, tmp_path):
    tensors = load_file(str(imagenet_resnet18))
    tensors["conv1.weight"] = tensors["conv1.weight"][:32]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    model = create_model("timm:resnet18", 100)
    with pytest.raises(imgcls.UserError, match=r"tensor conv1.weight has shape \(32, 3, 7, 7\)"):
        finetune.load_init(model, bad)
    with pytest.raises(imgcls.UserError, match="does not match the model"):
        finetune.load_init(create_model("timm:resnet34", 100), imagenet_resnet18)


def test_pretrained_forbid_refuses_init_before_anything_is_decoded(imagenet_resnet18, tiny_slice, tmp_path):
    with pytest.raises(imgcls.UserError, match="pretrained=forbid refuses initial weights"):
        imgcls.train(tiny_slice, tmp_path / "run", verbose=False,
                     **{**TIMM, "init": str(imagenet_resnet18), "pretrained": "forbid"})
    assert not list(Path(os.environ["IMGCLS_CACHE"]).iterdir()) and not (tmp_path / "run").exists()


def test_mean_std_of_the_weights_reaches_the_model_in_training_and_in_predict(imagenet_resnet18, food11_tiny,
                                                                             tmp_path):
    """A timm save_pretrained folder (config.json beside the weights) says the weights want mean/std 0.5:
    the model then sees (x - 0.5) / 0.5 though every view normalizes with ImageNet's statistics."""
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(imagenet_resnet18.read_bytes())
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 1000,
                                                     "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    run = tmp_path / "run"
    imgcls.train(food11_tiny, run, verbose=False, **{**SETTINGS, "model": "timm:resnet18", "image_size": 32,
                                                     "init": str(folder / "model.safetensors")})
    norm = json.loads((run / "manifest.json").read_text())["mean_std"]
    assert norm["mean"] == [0.5] * 3 and norm["source"].endswith("config.json")

    from imgcls import hardware, inference

    loaded = inference.load_run(run, hw=hardware.resolve(config.RunConfig(device="cpu")))
    seen = []
    loaded.model.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    pixels = torch.rand(2, 3, 32, 32)
    loaded.model(augment.normalize(pixels))
    assert torch.allclose(seen[0], (pixels - 0.5) / 0.5, atol=1e-5)


def test_mean_std_model_without_a_timm_config_says_what_to_do():
    cfg = config.resolve(overrides={"mean_std": "model"})
    with pytest.raises(imgcls.UserError, match="use mean_std=imagenet"):
        finetune.mean_std(create_model("resnet18s", 10), cfg)
    assert finetune.mean_std(create_model("timm:resnet18", 10), cfg)["mean"] == list(augment.MEAN)


def test_check_loads_init_before_decoding_and_estimates_the_subset_run(imagenet_resnet18, tiny_slice):
    result = imgcls.check(tiny_slice, verbose=False, **{**TIMM, "init": str(imagenet_resnet18), "lr_backbone": 0.1,
                                                        "freeze_epochs": 1})
    model = next(s for s in result.stages if s.name == "model")
    assert "the classifier (fc) is re-initialised: the file's has 1000 classes, this data 100" in model.detail
    assert result.estimate.steps_per_epoch == 200 // 32  # subset=3: 2 training images of each of 100 classes
    with pytest.raises(imgcls.UserError, match="does not match the model"):
        imgcls.check(tiny_slice, verbose=False, **{**TIMM, "model": "timm:resnet34", "init": str(imagenet_resnet18),
                                                   "image_size": 48})
    assert len(list(Path(os.environ["IMGCLS_CACHE"]).glob("*.npy"))) == 1  # no 48 px cache: refused before decoding
