"""Augmentations: per-sample random, reproducible from the generator, dtype/range/shape kept;
mixup/cutmix targets; soft-target losses; presets; `imgcls preview`."""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from conftest import FAST

from imgcls import augment, config
from imgcls.config import AugConfig
from imgcls.errors import UserError
from imgcls.losses import loss_fn, soft_cross_entropy, soft_focal_loss

SIZE = 32


def photo_rows(n: int = 6, side: int = 40, seed: int = 0) -> torch.Tensor:
    """uint8 [n, side, side, 3] cache rows: smooth random colour fields (like photos, unlike noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 5, generator=g)
    fine = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)
    return (fine * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def float_images(n: int = 6) -> torch.Tensor:
    """[n, 3, SIZE, SIZE] in [0, 1]: what the steps before `colour` pass on (on the GPU)."""
    return augment.resize(augment.to_float(photo_rows(n)), SIZE)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Every batch step, with settings that make each image's parameters matter (probabilities 1).
STEPS = {
    "crop_flip": partial(augment.geometric, size=SIZE, scale=(0.2, 1.0), ratio=(0.75, 1.33), hflip=0.5, rotate=0.0,
                         translate=0.0),
    "crop_rotate_translate": partial(augment.geometric, size=SIZE, scale=(0.5, 1.0), ratio=(0.75, 1.33), hflip=0.5,
                                     rotate=20.0, translate=0.1),
    "brightness": partial(augment.colour, brightness=0.4),
    "contrast": partial(augment.colour, contrast=0.4),
    "saturation": partial(augment.colour, saturation=0.4),
    "hue": partial(augment.colour, hue=0.2),
    "jitter_and_grey": partial(augment.colour, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1, grayscale=0.5),
    "randaugment": partial(augment.policy, space="randaugment", num_ops=2, magnitude=9),
    "trivialaugment": partial(augment.policy, space="trivialaugment", num_ops=1, magnitude=None),
    "erase": partial(augment.erase, p=1.0),
}
MIXES = {
    "mixup_batch": AugConfig(mixup_alpha=0.4),
    "mixup_sample": AugConfig(mixup_alpha=0.4, mix_mode="sample"),
    "cutmix_batch": AugConfig(cutmix_alpha=1.0),
    "both_sample": AugConfig(mixup_alpha=0.4, cutmix_alpha=1.0, mix_mode="sample", mix_prob=0.7),
}


def step_inputs(name: str, n: int = 6):
    """What each step gets in a pipeline: cache rows (uint8 view) for the crop, [0, 1] images for the
    policy and colour, normalized images for erasing."""
    rows = photo_rows(n)
    images = (rows.permute(0, 3, 1, 2) if name.startswith("crop") else
              augment.normalize(float_images(n)) if name == "erase" else float_images(n))
    return images, augment.one_hot(torch.arange(n) % 3, 3, 0.1)


NORMALIZED_OUT = {"brightness", "contrast", "saturation", "hue", "jitter_and_grey", "erase"}


def unit(out: torch.Tensor, name: str) -> torch.Tensor:
    """A step's output in [0, 1] floats (uint8 from the CPU crop, normalized from colour and erasing)."""
    if out.dtype == torch.uint8:
        return out.float() / 255
    return augment.denormalize(out) if name in NORMALIZED_OUT else out


@pytest.mark.parametrize("name", STEPS)
def test_step_keeps_dtype_range_shape_and_targets(name):
    images, targets = step_inputs(name)
    out, out_targets = STEPS[name](images, targets, gen())
    assert out.dtype == (torch.uint8 if name.startswith("crop") else torch.float32)  # the CPU crop stays uint8
    assert out.shape == (6, 3, SIZE, SIZE)
    x = unit(out, name)
    assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6 and torch.isfinite(x).all()
    assert torch.equal(out_targets, targets)


@pytest.mark.parametrize("name", STEPS)
def test_step_is_reproducible_from_the_generator_seed(name):
    images, targets = step_inputs(name)
    a, _ = STEPS[name](images, targets, gen(7))
    b, _ = STEPS[name](images, targets, gen(7))
    c, _ = STEPS[name](images, targets, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", STEPS)
def test_step_draws_parameters_per_sample(name):
    images, targets = step_inputs(name, n=1)
    same = images.expand(8, *images.shape[1:]).contiguous()  # 8 copies of one image in one batch
    out, _ = STEPS[name](same, targets.expand(8, -1), gen(3))
    distinct = {tuple(o.flatten()[::7].tolist()) for o in out}
    assert len(distinct) >= 4, f"{name}: 8 copies of one image gave only {len(distinct)} different results"


def test_cpu_uint8_crop_matches_the_grid_sample_path():
    """Both geometric paths draw the same parameters; they differ only by integer crop boxes."""
    rows = photo_rows(16, side=48)
    kw = dict(size=40, scale=(0.3, 1.0), ratio=(0.75, 1.33), hflip=0.5, rotate=0.0, translate=0.0)
    fast, _ = augment.geometric(rows.permute(0, 3, 1, 2), torch.zeros(16, 1), gen(1), **kw)
    warped, _ = augment.geometric(augment.to_float(rows), torch.zeros(16, 1), gen(1), **kw)
    assert (fast.float() / 255 - warped).abs().mean() < 0.03  # measured 0.012 (box rounding); a wrong flip or box gives 0.11


def test_crop_boxes_are_drawn_as_torchvision_draws_them():
    """The pixel boxes follow RandomResizedCrop.get_params (which timm's crop copies): the fit is tested
    after rounding the sides to pixels, and offsets are uniform over the positions that fit, edges
    included. Testing the fit before rounding halved the full-width crops (1.3% against 2.6% at 64 px)
    and rounding a continuous centre put a third fewer crops at the edges."""
    side, n, scale, ratio = 64, 30000, (0.35, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(0)
    theirs = np.array([torchvision.transforms.RandomResizedCrop.get_params(torch.empty(3, side, side), scale, ratio)
                       for _ in range(n)])  # top, left, height, width
    g = gen(0)
    w, h = augment.crop_sides(n, scale, ratio, g, side=side)
    ours = np.array(augment.crop_boxes(w, h, *torch.rand(2, n, generator=g), side=side))

    def stats(boxes):
        top, left, ch, cw = boxes.T
        inside = cw < side
        return np.array([(ch * cw).mean() / side**2, (cw == side).mean(), (ch == side).mean(),
                         (left[inside] == 0).mean(), (left[inside] == side - cw[inside]).mean(), (top == 0).mean()])

    assert np.abs(stats(ours) - stats(theirs)).max() < 0.006  # measured 0.002; the old draw: 0.045


def test_cpu_uint8_warp_matches_the_grid_sample_path():
    """With rotation and translation, OpenCV's warpAffine on the CPU runs the same per-image map as
    grid_sample, reflection at the border included."""
    rows = photo_rows(16, side=48)
    kw = dict(size=40, scale=(0.3, 1.0), ratio=(0.75, 1.33), hflip=0.5, rotate=30.0, translate=0.2)
    cpu, _ = augment.geometric(rows.permute(0, 3, 1, 2), torch.zeros(16, 1), gen(1), **kw)
    warped, _ = augment.geometric(augment.to_float(rows), torch.zeros(16, 1), gen(1), **kw)
    assert cpu.dtype == torch.uint8
    diff = (cpu.float() / 255 - warped).abs()
    assert diff.mean() < 0.003 and diff.max() < 0.1  # uint8 rounding; a half-pixel shift or wrong border gives more


def test_colour_single_factors_match_torchvision():
    x = float_images(4)
    ones = torch.ones(4)
    for key, tv in (("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
                    ("saturation", TF.adjust_saturation)):
        g = gen(5)
        factors = augment.uniform(4, 0.6, 1.4, gen(5))  # the colour step's first draw
        out, _ = augment.colour(x, ones, g, **{key: 0.4})
        expected = torch.stack([tv(img, float(f)) for img, f in zip(x, factors)])
        torch.testing.assert_close(augment.denormalize(out), expected, atol=2e-4, rtol=0, msg=key)  # luma 0.299 / 0.2989
    grey, _ = augment.colour(x, ones, gen(), grayscale=1.0)
    torch.testing.assert_close(augment.denormalize(grey), TF.rgb_to_grayscale(x, num_output_channels=3), atol=2e-4, rtol=0)
    plain, _ = augment.colour(x, ones, gen())  # no factors: the normalization alone
    torch.testing.assert_close(plain, augment.normalize(x))


def test_jitter_factors_commute_so_one_map_is_any_order():
    """torchvision applies brightness, contrast, saturation and hue in a random order per call. Without
    clamping in between (low-chroma images: nothing leaves [0, 1]) every order gives the same image,
    and that image is what `colour` makes from the same draws."""
    import itertools

    x = float_images(4) * 0.3 + 0.35
    bri, con, sat, turns = (augment.uniform(4, lo, hi, g) for g in [gen(3)] for lo, hi in
                            [(0.8, 1.2), (0.8, 1.2), (0.8, 1.2), (-0.1, 0.1)])  # the colour step's draws, in order
    hue = augment._yiq_hue_rotations(turns)
    ops = {"b": lambda im: torch.stack([TF.adjust_brightness(i, float(f)) for i, f in zip(im, bri)]),
           "c": lambda im: torch.stack([TF.adjust_contrast(i, float(f)) for i, f in zip(im, con)]),
           "s": lambda im: torch.stack([TF.adjust_saturation(i, float(f)) for i, f in zip(im, sat)]),
           "h": lambda im: torch.einsum("bck,bkhw->bchw", hue, im)}
    results = []
    for order in itertools.permutations("bcsh"):
        im = x
        for k in order:
            im = ops[k](im)
        results.append(im)
    assert all(r.min() > 0 and r.max() < 1 for r in results)  # no clamping happened
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=2e-4, rtol=0)  # luma 0.299 here, 0.2989 in torchvision
    out, _ = augment.colour(x, torch.ones(4), gen(3), brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)
    torch.testing.assert_close(augment.denormalize(out), results[0], atol=2e-4, rtol=0)


def test_cpu_uint8_colour_matches_the_float_path():
    """From uint8 on the CPU (OpenCV, rounding to uint8 before normalizing) as from [0, 1] floats."""
    rows = photo_rows(20, side=SIZE).permute(0, 3, 1, 2)
    kw = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale=0.2)
    cpu, _ = augment.colour(rows, torch.ones(20), gen(4), **kw)
    flt, _ = augment.colour(rows.float() / 255, torch.ones(20), gen(4), **kw)
    assert cpu.is_contiguous(memory_format=torch.channels_last)  # what the model takes on the CPU
    diff = (augment.denormalize(cpu) - augment.denormalize(flt)).abs()
    assert diff.max() <= 1 / 255 and diff.mean() < 0.3 / 255  # uint8 rounding (measured max 0.69/255), nothing else
    plain, _ = augment.colour(rows, torch.ones(20), gen())
    torch.testing.assert_close(plain, augment.normalize(rows.float() / 255))


def test_hue_rotation_keeps_luma_and_a_full_turn_is_identity():
    x = float_images(4) * 0.2 + 0.4  # low chroma: rotated colours stay inside [0, 1], no clamping
    w = torch.tensor(augment.GREY).view(1, 3, 1, 1)
    out, _ = augment.colour(x, torch.ones(4), gen(), hue=0.3)
    torch.testing.assert_close((augment.denormalize(out) * w).sum(1), (x * w).sum(1), atol=1e-5, rtol=0)
    turn = augment._yiq_hue_rotations(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(turn, torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)


def test_every_policy_op_keeps_range_and_shape():
    x = float_images(4)
    for name, op in augment.POLICY_OPS.items():
        for space in ("randaugment", "trivialaugment"):
            mag = torch.tensor([1.0, -1.0, 0.5, 0.0]) * getattr(op, space)
            out = op.fn(x, mag if op.signed else mag.abs())
            assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1, (name, space)


def test_erasing_fills_one_box_with_the_mean_colour_and_p0_is_identity():
    x = augment.normalize(float_images(6))
    out, _ = augment.erase(x, torch.ones(6), gen(), p=1.0)
    changed = (out != x).any(1)  # [B, H, W]
    assert changed.flatten(1).any(1).all()
    mean = torch.tensor(augment.MEAN).view(3, 1)
    for o, c in zip(augment.denormalize(out), changed):
        torch.testing.assert_close(o[:, c], mean.expand(3, int(c.sum())))
    same, _ = augment.erase(x, torch.ones(6), gen(), p=0.0)
    assert torch.equal(same, x)


# --- mixup / cutmix ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MIXES)
def test_mixed_targets_are_distributions_and_reproducible(name):
    x, t = float_images(8), augment.one_hot(torch.arange(8) % 4, 4, 0.1)
    out, targets = augment.mix(x, t, gen(2), MIXES[name], epoch=0, epochs=10)
    assert out.shape == x.shape and out.dtype == x.dtype and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert (targets >= 0).all()
    out2, targets2 = augment.mix(x, t, gen(2), MIXES[name], epoch=0, epochs=10)
    assert torch.equal(out, out2) and torch.equal(targets, targets2)


def test_target_weight_is_the_share_of_pixels_each_image_keeps():
    """Constant images 0 and 1: a pixel's value says whose it is, for mixup and cutmix alike."""
    x = torch.zeros(8, 3, 16, 16)
    x[4:] = 1.0
    t = F.one_hot(torch.tensor([0] * 4 + [1] * 4), 2).float()
    for cfg in MIXES.values():
        out, targets = augment.mix(x, t, gen(4), cfg, epoch=0, epochs=10)
        torch.testing.assert_close(out.mean((1, 2, 3)), targets[:, 1], atol=1e-6, rtol=0)


def test_per_sample_mode_gives_each_image_its_own_lambda():
    x, t = float_images(8), F.one_hot(torch.arange(8), 8).float()
    _, per_batch = augment.mix(x, t, gen(1), AugConfig(mixup_alpha=1.0), epoch=0, epochs=5)
    _, per_sample = augment.mix(x, t, gen(1), AugConfig(mixup_alpha=1.0, mix_mode="sample"), epoch=0, epochs=5)
    kept = lambda targets: targets.diagonal()  # noqa: E731 - the weight each image keeps of its own label
    assert len(set(kept(per_batch).tolist())) == 1
    assert len(set(kept(per_sample)[:4].tolist())) == 4


def test_mixing_switches_off_for_the_last_epochs_and_when_unconfigured():
    x, t = float_images(4), F.one_hot(torch.arange(4), 4).float()
    cfg = AugConfig(mixup_alpha=1.0, cutmix_alpha=1.0, mix_off_epochs=3)
    assert not torch.equal(augment.mix(x, t, gen(), cfg, epoch=6, epochs=10)[1], t)
    for epoch in (7, 8, 9):
        out, targets = augment.mix(x, t, gen(), cfg, epoch=epoch, epochs=10)
        assert out is x and targets is t
    assert augment.mix(x, t, gen(), AugConfig(), epoch=0, epochs=10)[0] is x


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_beta_sampler_follows_the_beta_distribution(alpha):
    from scipy import stats

    draws = augment.beta(alpha, 20000, gen(11)).double().numpy()
    assert np.all((draws >= 0) & (draws <= 1))
    # The empirical CDF of min(x, 1 - x) (Beta(a, a) is symmetric) against the true one, from 1e-6 up:
    # float32 rounds draws within 6e-8 of 1 to 1.0 (1.9% of Beta(0.2, 0.2)), so no test below that.
    # DKW: a correct sampler exceeds 0.015 with probability 2 exp(-2 n 0.015^2) = 2.5e-4.
    folded = np.sort(np.minimum(draws, 1 - draws))
    ys = np.linspace(1e-6, 0.5, 500)
    empirical = np.searchsorted(folded, ys, side="right") / len(folded)
    assert np.abs(empirical - 2 * stats.beta(alpha, alpha).cdf(ys)).max() < 0.015


# --- losses ------------------------------------------------------------------------------------

def test_soft_cross_entropy_equals_cross_entropy_on_one_hot_and_with_smoothing():
    logits, labels = torch.randn(16, 5, generator=gen()), torch.arange(16) % 5
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(labels, 5).float()), F.cross_entropy(logits, labels))
    torch.testing.assert_close(soft_cross_entropy(logits, augment.one_hot(labels, 5, 0.1)),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_label_smoothing_composes_with_mixup():
    """Smoothing, then mixing (the order fit() uses): still distributions, and the soft CE of the mixed
    targets is lam * CE(a) + (1 - lam) * CE(b), each with F.cross_entropy's label_smoothing."""
    x, labels = float_images(8), torch.arange(8) % 4
    smoothed = augment.one_hot(labels, 4, 0.1)
    mixed_x, targets = augment.mix(x, smoothed, gen(6), AugConfig(mixup_alpha=1.0), epoch=0, epochs=10)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert targets.min() >= 0.1 / 4 - 1e-6  # no class loses the smoothing mass
    # image 0 (label 0) is mixed with image 7 (label 3): the gap of their targets is (2 lam - 1) * 0.9
    lam = (float(targets[0, 0] - targets[0, 3]) / 0.9 + 1) / 2
    assert 0 < lam < 1
    torch.testing.assert_close(mixed_x, lam * x + (1 - lam) * x.flip(0), atol=1e-6, rtol=0)
    logits = torch.randn(8, 4, generator=gen(9))
    expected = (lam * F.cross_entropy(logits, labels, label_smoothing=0.1)
                + (1 - lam) * F.cross_entropy(logits, labels.flip(0), label_smoothing=0.1))
    torch.testing.assert_close(soft_cross_entropy(logits, targets), expected)


def test_focal_loss_with_soft_targets():
    logits, labels = torch.randn(16, 5, generator=gen()), torch.arange(16) % 5
    one_hot = F.one_hot(labels, 5).float()
    p_true = logits.softmax(1)[torch.arange(16), labels]
    classic = (-(1 - p_true) ** 2 * torch.log(p_true)).mean()  # Lin et al. 2017, one-hot targets
    torch.testing.assert_close(soft_focal_loss(logits, one_hot, 2.0), classic)
    soft = augment.one_hot(labels, 5, 0.1)
    torch.testing.assert_close(soft_focal_loss(logits, soft, 0.0), soft_cross_entropy(logits, soft))
    mixed = 0.7 * soft + 0.3 * soft.flip(0)  # mixup targets: linear in the targets
    torch.testing.assert_close(soft_focal_loss(logits, mixed, 2.0),
                               0.7 * soft_focal_loss(logits, soft, 2.0) + 0.3 * soft_focal_loss(logits, soft.flip(0), 2.0))
    logits.requires_grad_(True)
    loss_fn(logits, mixed, focal_gamma=2.0).backward()
    assert torch.isfinite(logits.grad).all() and soft_focal_loss(logits, mixed, 2.0) < soft_cross_entropy(logits, mixed)


# --- pipeline, config, presets -----------------------------------------------------------------

def test_pipeline_from_config_runs_every_step_per_sample():
    cfg = AugConfig(rotate=10, translate=0.05, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, grayscale=0.1,
                    policy="randaugment", erasing=0.5)
    steps = augment.build_train_pipeline(cfg, size=SIZE)
    assert [s.func for s in steps] == [augment.geometric, augment.policy, augment.colour, augment.erase]
    rows = photo_rows(1).expand(8, -1, -1, -1)
    a, _ = augment.train_views(rows, torch.zeros(8, 1), gen(1), steps)
    b, _ = augment.train_views(rows, torch.zeros(8, 1), gen(1), steps)
    assert torch.equal(a, b) and a.shape == (8, 3, SIZE, SIZE)
    assert len({tuple(x.flatten()[::5].tolist()) for x in a}) == 8


@pytest.mark.parametrize("key,value,fragment", [
    ("erasing", 1.5, "erasing=1.5 is a probability"), ("hue", 0.7, "hue=0.7"), ("brightness", -0.1, "brightness=-0.1"),
    ("policy_magnitude", 31, "policy_magnitude=31"), ("mixup_alpha", -1.0, "mixup_alpha=-1.0"),
])
def test_bad_augmentation_settings_say_what_to_fix(key, value, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        augment.build_train_pipeline(replace(AugConfig(), **{key: value}), size=SIZE)


@pytest.mark.parametrize("preset", ["food11-light", "food11-strong", "tiny-imagenet-light", "tiny-imagenet-strong"])
def test_presets_resolve_and_build(preset):
    cfg = config.resolve(file=preset)
    steps = augment.build_train_pipeline(cfg.aug, size=cfg.data.image_size)
    rows = photo_rows(4, side=cfg.data.cache_size or cfg.data.image_size)
    x, t = augment.train_views(rows, augment.one_hot(torch.arange(4), 4), gen(), steps)
    x, t = augment.mix(x, t, gen(), cfg.aug, epoch=0, epochs=cfg.run.epochs)
    assert x.shape == (4, 3, cfg.data.image_size, cfg.data.image_size)
    if preset.endswith("strong"):
        assert cfg.aug.policy != "none" and cfg.aug.erasing > 0 and cfg.aug.mixup_alpha > 0 and cfg.aug.cutmix_alpha > 0


def test_training_with_mixup_cutmix_and_focal_loss(food11_tiny, tmp_path):
    from imgcls.cli import main

    out = tmp_path / "run"
    rc = main(["train", str(food11_tiny), "--out", str(out), *FAST, "mixup_alpha=0.2", "cutmix_alpha=1.0",
               "mix_mode=sample", "mix_off_epochs=1", "focal_gamma=2", "policy=trivialaugment", "erasing=0.25",
               "brightness=0.2", "grayscale=0.1"])
    assert rc == 0 and (out / "best.safetensors").is_file()


def test_preview_writes_grid_and_views_with_five_distinct_views(food10_slice, tmp_path, capsys):
    from PIL import Image

    from imgcls.cli import main

    out = tmp_path / "preview"
    rc = main(["preview", str(food10_slice), "--out", str(out), "--views", "6", "--images", "3", "image_size=48",
               "device=cpu", "progress=false", "decode_workers=1", "brightness=0.2"])
    assert rc == 0
    views = sorted((out / "views").glob("*.png"))
    assert len(views) == 3 * 7
    stems = {p.stem.rsplit("_", 1)[0] for p in views}
    assert len(stems) == 3 and all((out / "views" / f"{s}_{k}.png").is_file() for s in stems for k in range(7))
    grid = np.asarray(Image.open(out / "grid.png"))
    cell = 128 // 48 * 48  # small views are enlarged for the grid
    assert grid.shape == (3 * cell + 2 * 4, 7 * cell + 6 * 4, 3)
    for s in stems:
        imgs = np.stack([np.asarray(Image.open(out / "views" / f"{s}_{k}.png")) for k in range(1, 7)])
        assert imgs.shape == (6, 48, 48, 3)
        assert len({im.tobytes() for im in imgs}) >= 5
    assert "fewest distinct training views of one image: 6 of 6" in capsys.readouterr().out


def test_preview_uses_the_training_generator_and_pipeline(food10_slice):
    """The preview's views are exactly what train_views gives with fit()'s augmentation seed."""
    from imgcls import data, hardware, previewing

    cfg = config.resolve(overrides=["image_size=32", "device=cpu", "decode_workers=1", "seed=3", "hue=0.1"])
    prep = data.prepare(food10_slice, cfg, progress=False)
    shown = previewing.render(prep, cfg, views=2, images=2)
    rows = previewing.pick_rows(prep, 2)
    g = hardware.make_generator(torch.device("cpu"), cfg.run.seed + 1)
    steps = augment.build_train_pipeline(cfg.aug, size=32)
    batch = torch.from_numpy(np.array(prep.images[rows]))
    targets = augment.one_hot(torch.as_tensor(prep.labels[rows]), prep.dataset.num_classes, cfg.optim.label_smoothing)
    for k in (1, 2):
        x, _ = augment.train_views(batch, targets, g, steps)
        assert np.array_equal(shown.views[:, k], previewing.to_uint8(augment.denormalize(x)))
    assert np.array_equal(shown.views[:, 0], previewing.to_uint8(augment.denormalize(augment.eval_views(batch, size=32, crop=cfg.data.eval_crop))))
    assert len(set(prep.labels[rows])) == 2  # one image per class
    assert Path(prep.dataset.root) == Path(food10_slice)
