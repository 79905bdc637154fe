"""What turns gradients into a trained model: the optimizer, the schedules (learning rate, image size), the weight EMA."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from imgcls.config import DataConfig, OptimConfig


def peak_lr(cfg: OptimConfig, batch_size: int) -> float:
    """`lr` is given per 512 images of global batch and scaled linearly (Goyal et al. 2017),
    so one config trains the same on any batch size and number of ranks."""
    return cfg.lr * batch_size / 512


def _cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


# Decay shapes after the warmup: fraction of the way from `floor` to `peak` at `progress` in [0, 1].
DECAYS = {
    "cosine": lambda progress, cfg: _cosine(progress),
    # fastai's fit_flat_cos (the Imagenette leaderboard entries): the peak until decay_start, then cosine.
    "flat_cos": lambda progress, cfg: _cosine((progress - cfg.decay_start) / max(1e-9, 1 - cfg.decay_start)),
    "linear": lambda progress, cfg: 1 - min(1.0, progress),
}


def lr_at(step: int, *, total: int, warmup: int, peak: float, cfg: OptimConfig) -> float:
    """The learning rate of optimizer step `step` of `total`: linear warmup to `peak` over `warmup` steps
    (at most a fifth of the run, so a 1- or 2-epoch run still decays), then cfg.schedule's decay to
    peak * cfg.min_lr_ratio. onecycle (Smith 2018, as torch's OneCycleLR):
    cosine from peak/25 up to the peak over the first 25% of the steps, then cosine down to peak/1e4."""
    if cfg.schedule == "onecycle":
        up = max(1, round(0.25 * total))
        if step < up:
            return peak / 25 + (peak - peak / 25) * (1 - _cosine(step / up))
        return peak / 1e4 + (peak - peak / 1e4) * _cosine((step - up) / max(1, total - up))
    warmup = min(warmup, total // 5)
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * cfg.min_lr_ratio
    return floor + (peak - floor) * DECAYS[cfg.schedule]((step - warmup) / max(1, total - warmup), cfg)


def size_at(epoch: int, *, epochs: int, size: int, scale: float, end: float) -> int:
    """Progressive resizing (fastai's Imagenette recipe; Touvron et al. 2019 on why the last epochs
    must be at full size): epoch 0 trains at scale * size, growing linearly to `size` by the epoch at
    fraction `end` of the run and staying there. Sides are multiples of 16 px (at least 32): fewer
    distinct shapes for the kernels to be set up for. scale >= 1: every epoch at `size`."""
    if scale >= 1:
        return size
    full = max(1, round(end * epochs))
    side = scale * size + (size - scale * size) * min(1.0, epoch / full)
    return size if epoch >= full else min(size, max(32, int(side // 16) * 16))


@dataclass(frozen=True)
class Schedule:
    """The length of a run and what follows from it: the learning rate of each step, the image size of
    each epoch, the EMA's horizon. Settled before training starts; a shorter plan mid-run
    (training.replan) is a new Schedule, never an edit of the settings."""
    epochs: int
    steps_per_epoch: int  # the last partial batch is dropped
    batch_size: int  # global, over all ranks
    optim: OptimConfig
    data: DataConfig

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup(self) -> int:
        return int(self.optim.warmup_epochs * self.steps_per_epoch)

    @property
    def peak(self) -> float:
        return peak_lr(self.optim, self.batch_size)

    def lr(self, step: int) -> float:
        return lr_at(step, total=self.total_steps, warmup=self.warmup, peak=self.peak, cfg=self.optim)

    def size(self, epoch: int) -> int:
        d = self.data
        return size_at(epoch, epochs=self.epochs, size=d.image_size, scale=d.prog_scale, end=d.prog_end)

    def ema_decay(self) -> float:
        return ema_decay(self.optim.ema, self.total_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled learning rate into every group, times its lr_scale (lr_backbone=: finetune.param_groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights decay, norms and biases do not (their scale carries no overfitting)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """cfg.optimizer through timm's optimizer factory (recipes.OPTIMIZERS names timm's optimizer for
    each). The lr set here is replaced before every step by the schedule."""
    import timm.optim

    from imgcls.recipes import OPTIMIZERS

    entry = OPTIMIZERS[cfg.optimizer]
    name = entry.timm_name
    if name == "sgd" and not cfg.nesterov:
        name = "momentum"  # timm: sgd = Nesterov momentum, momentum = plain momentum
    kwargs = {**entry.options, **({"momentum": cfg.momentum} if name in ("sgd", "momentum") else {})}
    if cfg.lr_backbone != 1 or cfg.freeze_epochs:  # head and backbone apart (only then: old state.pt files keep 2 groups)
        from imgcls import finetune

        groups = finetune.param_groups(model, cfg.weight_decay, cfg.lr_backbone)
    else:
        groups = param_groups(model, cfg.weight_decay)
    return timm.optim.create_optimizer_v2(groups, opt=name, lr=cfg.lr,
                                          weight_decay=cfg.weight_decay, **kwargs)


def averaging(weight: Callable[[torch.Tensor], torch.Tensor]):
    """AveragedModel's multi_avg_fn that moves the average towards the newest weights by weight(n) after
    n updates (a tensor: no CPU-GPU sync per step); integer buffers are copied."""
    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor) -> None:
        if not ema_params[0].is_floating_point():  # integer buffers (BatchNorm's num_batches_tracked)
            torch._foreach_copy_(ema_params, params)
            return
        torch._foreach_lerp_(ema_params, params, weight(n).to(ema_params[0].dtype))
    return update


def ema_update(decay: float):
    """AveragedModel's multi_avg_fn for an EMA whose decay warms up as min(decay, (1 + n) / (10 + n))
    over its n updates (TensorFlow's ExponentialMovingAverage with num_updates). torch's
    get_ema_multi_avg_fn uses `decay` from the first step: a 69-step food-10 run with ema=0.999
    then evaluated weights still 93% random (val_acc 0.100 = chance at every epoch). The warm-up also caps
    the horizon at about n / 9 steps for good: a decay asking for more than about the last ninth of the
    steps so far gets that ninth (benchmarks/sweep.py --ema-shares measures longer tails its own way)."""
    return averaging(lambda n: 1 - torch.clamp((1 + n) / (10 + n), max=decay))


EMA_SHARE = 0.1  # ema=auto averages over about this share of the run's steps


def ema_decay(setting: float | str, total_steps: int) -> float:
    """ema=auto: a decay whose horizon (1 / (1 - decay) steps) is EMA_SHARE of the run, so a 5-epoch run
    averages its last few dozen steps and a 200-epoch run its last 20 epochs; a fixed decay such as
    0.999 (1000 steps) would average mostly the early, untrained weights of a short run."""
    if setting != "auto":
        return float(setting)
    return 1 - 1 / max(2.0, EMA_SHARE * total_steps)


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights (and BatchNorm buffers), or None when decay is 0."""
    if not decay:
        return None
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=True)
