"""The recipe: what the `auto` settings become and what each preset holds, with the measurement behind
each choice (BENCHMARKS.md, "Recipes"). Pure data and two functions, `filled`, which config.resolve()
calls after every layer of settings is applied, and `aug_values`, which also settles aug=auto once
epochs=auto is planned: a key the user set (in a file, as key=value, or as a dataset layout's
default) is never changed here; the resolved values are saved in config.yaml,
so a resumed or repeated run trains exactly as the first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Optimizer:
    timm_name: str  # timm.optim.create_optimizer_v2's opt=
    lr: float  # default peak learning rate per 512 images of batch
    weight_decay: float  # default, on weights only (not on norms and biases)
    options: dict = field(default_factory=dict)  # more keyword arguments of timm's optimizer


OPTIMIZERS = {
    "sgd": Optimizer("sgd", lr=0.8, weight_decay=5e-4),  # Nesterov momentum 0.9 (momentum= and nesterov= apply)
    "adamw": Optimizer("adamw", lr=0.024, weight_decay=0.05),
    "lamb": Optimizer("lamb", lr=0.04, weight_decay=0.02),
    "ranger": Optimizer("lookahead_radam", lr=0.064, weight_decay=0.01),  # fastai's Imagenette entries: 8e-3 at batch 64
    # The default. Muon (airbench's CIFAR-10 optimizer): Nesterov momentum orthogonalised by Newton-Schulz on
    # conv and linear weights, NAdamW on norms and biases; timm scales its step to AdamW's RMS. food-10, 128 px,
    # 5 epochs, batch 32, 3 seeds: lr 0.096 64.5 +- 0.4% (0.048: 63.4 +- 0.7%) against LAMB's 53.6 +- 0.6%.
    # 3 Newton-Schulz steps instead of timm's 5: 65.2 +- 0.1% in 342 s against 409 s (2-core CPU, where the
    # iterations on every conv weight cost as much as the model's own step at batch 32). 20 epochs: 73.0 +- 0.5%.
    "muon": Optimizer("nmuon", lr=0.096, weight_decay=0.05, options={"ns_steps": 3}),
}

AUG_PRESETS = {
    # Crop and flip only: what converges in a few epochs (the Imagenette README: "mixup tends to only
    # help for 80+ epochs").
    "light": dict(crop_scale=(0.35, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5, brightness=0.0, contrast=0.0,
                  saturation=0.0, hue=0.0, policy="none", erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0),
    # A few dozen epochs: wider crops and mild colour jitter.
    "medium": dict(crop_scale=(0.25, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5, brightness=0.2, contrast=0.2,
                   saturation=0.2, hue=0.0, policy="none", erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0),
    # Long schedules: a policy op, erasing and mixing each epoch keep later epochs teaching.
    "strong": dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5, brightness=0.0, contrast=0.0,
                   saturation=0.0, hue=0.0, policy="trivialaugment", erasing=0.25, mixup_alpha=0.2,
                   cutmix_alpha=1.0, mix_prob=0.8, mix_mode="sample"),
}
# 5 epochs or fewer: light with crops of at least 60% of the image. food-10, 128 px, 5 epochs, 3 seeds:
# 50.4 +- 0.2% against light's 48.9 +- 0.7% (better at every seed; not measured beyond 5 epochs).
AUG_PRESETS["short"] = {**AUG_PRESETS["light"], "crop_scale": (0.6, 1.0)}
# medium with strong's mixing: each image mixed with probability 0.8, by mixup or cutmix at even odds.
# food-10, 128 px, 80 epochs, 3 seeds: 77.5 +- 0.7% against medium's 75.7 +- 0.2%, paired +1.9 +- 0.7
# points (every seed higher); at 60 epochs 76.5 +- 0.2% against 75.5 +- 0.3%, paired +1.0 +- 0.2 over 3 seeds
# (every seed higher); at 40 epochs +1.0 +- 0.7 over 5 seeds, not a win: aug=auto mixes above 40.
AUG_PRESETS["medium-mix"] = {**AUG_PRESETS["medium"], **{key: AUG_PRESETS["strong"][key] for key in
                                                         ("mixup_alpha", "cutmix_alpha", "mix_prob", "mix_mode")}}
AUG_BY_EPOCHS = ((5, "short"), (30, "light"), (40, "medium"), (80, "medium-mix"), (math.inf, "strong"))  # up to N epochs


def aug_for(epochs: int) -> str:
    """aug=auto: the preset for a schedule of this many epochs. On food-10 at 128 px (resnet18d): at 40 epochs
    mixing +1.0 +- 0.7 points over medium (5 seeds, below 2 s.e.); at 80 medium-mix +1.9 +- 0.7 over medium
    and strong -1.1 +- 0.9 against medium-mix (+0.8 +- 0.25 over medium; 3 paired seeds each), strong still
    rising at epoch 80: hence strong only beyond 80, where it is not measured. On tiny20 (64 px, 8,000 images)
    at 40 epochs medium-mix ties medium (one seed); at 41-80 there it is not measured."""
    return next(name for most, name in AUG_BY_EPOCHS if epochs <= most)


def model_for(image_size: int) -> str:
    """model=auto: the ResNet-D stem (3 convs, stride 4) from 64 px up - at 64 px (tiny20, 10 epochs)
    66.1% in 467 s against the stride-2 resnet18s2's 64.4% in 721 s; at 128 px (food-10, 5 epochs)
    resnet18d 50.1% in ~190 s, resnet26d 50.2% in 342 s; at 80 epochs (food-10, 128 px, medium-mix, 3 seeds)
    resnet26d 78.2 +- 0.1% against 77.5 +- 0.7%, paired +0.7 +- 0.8 points at 1.36-1.5x the wall. Below 64 px
    (not measured) the stride-2 stem keeps 16x16 maps at 32 px where stride 4 would leave 8x8."""
    return "resnet18s2" if image_size < 64 else "resnet18d"


def batch_for(image_size: int) -> int:
    """batch_size unset: 64 from 64 px up to 96, else 32. At 64 px Muon's step costs more than the model's at
    batch 32 (tiny20, 10 epochs, 3 seeds: batch 64 74.5 +- 0.3% against 74.6 +- 0.4%, paired -0.1 +- 0.3
    points, in 0.63x the wall); at 128 px batch 64 loses (food-10, 20 epochs, 3 seeds: -1.2 +- 0.4 points at
    0.8x the wall). Below 64 px (resnet18s2) and from 96 to 127 px: not measured, so 32."""
    return 64 if 64 <= image_size < 96 else 32


def filled(cfg, given: frozenset[str] | set[str]) -> dict:
    """The values of `auto` and unset settings of a Config, as bare key -> value; keys in `given` are kept."""
    values = {}
    optimizer = OPTIMIZERS.get(cfg.optim.optimizer)
    if optimizer:
        if not cfg.optim.lr:
            values["lr"] = optimizer.lr
        if "weight_decay" not in given:
            values["weight_decay"] = optimizer.weight_decay
    if cfg.model.model == "auto":
        values["model"] = model_for(cfg.data.image_size)
    if "batch_size" not in given:
        values["batch_size"] = batch_for(cfg.data.image_size)
    if cfg.aug.aug != "custom" and not (cfg.aug.aug == "auto" and cfg.run.epochs == "auto"):
        values.update(aug_values(cfg.aug.aug, cfg.run.epochs, given))  # epochs=auto: once the plan knows the epochs
    return values


def aug_values(aug: str, epochs: int, given: frozenset[str] | set[str]) -> dict:
    """aug=<preset>, or auto for a run of `epochs`: the preset's values for the aug keys the user did not
    set, and `aug` itself as the preset's name, so the saved config says which one it was. custom: none."""
    if aug == "custom":
        return {}
    name = aug_for(epochs) if aug == "auto" else aug
    return {**{key: value for key, value in AUG_PRESETS[name].items() if key not in given}, "aug": name}
