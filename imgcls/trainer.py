"""The training step: cache rows -> an augmented batch on the device -> forward and backward per
micro-batch, update, EMA. `train_step` and `model_step` are the whole of it; `epoch_batches` gives it
this epoch's rows, `Augmenter` makes the batch, `StepTimer` splits its seconds between the data path
and the model. What the step changes lives in a state.TrainState; when to stop, evaluate and save is
training.fit()'s business.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from imgcls import augment, distributed, finetune, hardware, optim
from imgcls.config import Config
from imgcls.losses import loss_fn
from imgcls.optim import Schedule
from imgcls.state import TrainState

CHECK_EVERY = 20  # steps between NaN checks and progress updates: .item() is a CPU-GPU sync point


class Augmenter:
    """Cache rows -> (normalized, augmented, mixed images in the memory format; soft targets) on the device,
    with the training pipeline of the epoch's image size (built once per size)."""

    def __init__(self, cfg: Config, images: torch.Tensor, labels: np.ndarray, num_classes: int,
                 hw: hardware.Hardware):
        self.aug, self.smoothing, self.hw, self.num_classes = cfg.aug, cfg.optim.label_smoothing, hw, num_classes
        self.images, self.labels = images, torch.as_tensor(labels)
        self.pipelines: dict[int, list] = {}

    def pipeline(self, size: int) -> list:
        if size not in self.pipelines:
            self.pipelines[size] = augment.build_train_pipeline(self.aug, size=size)
        return self.pipelines[size]

    def __call__(self, rows: torch.Tensor, gen: torch.Generator, *, epoch: int,
                 schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
        hw = self.hw
        batch = self.images.index_select(0, rows.to(self.images.device)).to(hw.device, non_blocking=True)  # images[rows]: 7x slower on the CPU
        labels = self.labels[rows].to(hw.device, non_blocking=True)
        with torch.no_grad():
            targets = augment.one_hot(labels, self.num_classes, self.smoothing)
            x, targets = augment.train_views(batch, targets, gen, self.pipeline(schedule.size(epoch)))
            x, targets = augment.mix(x, targets, gen, self.aug, epoch=epoch, epochs=schedule.epochs)
        return x.contiguous(memory_format=hw.memory_format), targets


def epoch_batches(state: TrainState, train_rows: torch.Tensor, schedule: Schedule, cfg: Config) -> Iterator[torch.Tensor]:
    """The rest of this epoch's global batches, from state.step on, as this rank's slice of cache rows.
    Every rank draws the same order."""
    state.model.train()  # evaluation left it in eval mode
    if cfg.optim.freeze_epochs:
        finetune.set_frozen(state.model, state.epoch < cfg.optim.freeze_epochs)
    state.epoch_gen_state = state.data_gen.get_state()
    perm = torch.randperm(len(train_rows), generator=state.data_gen)
    b = schedule.batch_size
    for step in range(state.step, schedule.steps_per_epoch):
        yield distributed.shard(train_rows[perm[step * b:(step + 1) * b]], state.ranks)


class StepTimer:
    """Each step's seconds, split between the data path and the model. On the CPU a clock read between
    them. On a GPU the kernels run after their launch, so a clock would time the launches: CUDA events
    mark the points instead and are read at flush(), after a synchronize, with the wall time since the
    last flush as the steps' pace (`step_seconds`)."""

    def __init__(self, device: torch.device):
        self.cuda, self.device = device.type == "cuda", device
        self.pending: list[tuple] = []
        self.step_seconds, self.since = 0.0, time.perf_counter()

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, start, mid, end, sums: dict) -> None:
        if self.cuda:
            self.pending.append((start, mid, end))
            return
        self.step_seconds = end - start
        sums["data"] += mid - start
        sums["model"] += end - mid
        sums["seconds"] += end - start

    def flush(self, sums: dict) -> None:
        """GPU: wait for the marked steps and add their seconds to `sums`. A no-op on the CPU."""
        if self.cuda and self.pending:
            self.pending[-1][2].synchronize()
            now = time.perf_counter()
            for start, mid, end in self.pending:
                sums["data"] += start.elapsed_time(mid) / 1000  # milliseconds
                sums["model"] += mid.elapsed_time(end) / 1000
            sums["seconds"] += now - self.since
            self.step_seconds = (now - self.since) / len(self.pending)
            self.pending, self.since = [], now

    def restart(self) -> None:
        """After time that is not training (an evaluation, a checkpoint): the next steps' wall clock starts now."""
        self.since = time.perf_counter()


def train_step(state: TrainState, batch: Augmenter, rows: torch.Tensor, *, schedule: Schedule, cfg: Config,
               timer: StepTimer) -> None:
    """One optimizer step on one batch: the learning rate of this step, augmentation on the device (the
    data path), then model_step(). Running sums stay on the device (no sync point)."""
    start = timer.mark()
    optim.set_lr(state.optimizer, schedule.lr(state.epoch * schedule.steps_per_epoch + state.step))
    x, targets = batch(rows, state.aug_gen, epoch=state.epoch, schedule=schedule)
    mid = timer.mark()
    model_step(state, x, targets, cfg)
    state.step += 1
    state.sums["seen"] += len(x)
    timer.add(start, mid, timer.mark(), state.sums)


def model_step(state: TrainState, x: torch.Tensor, targets: torch.Tensor, cfg: Config) -> None:
    """Forward and backward per micro-batch, update, EMA (benchmarks/gpu_check.py times it alone)."""
    accum, sums = cfg.optim.accum_steps, state.sums
    for k, (xs, ts) in enumerate(zip(x.chunk(accum), targets.chunk(accum))):
        with distributed.no_sync(state.ddp, skip=k < accum - 1):  # one all-reduce per step
            with state.hw.autocast():
                logits = state.step_model(xs)
            loss = loss_fn(logits.float(), ts, focal_gamma=cfg.optim.focal_gamma)
            state.scale.backward(loss / accum)
        sums["correct"] += (logits.argmax(1) == ts.argmax(1)).sum()
        state.scale.add_loss(sums, loss.detach(), len(xs))  # every micro-batch's loss, not the last one's
    state.scale.step(state.optimizer, state.model, clip=cfg.optim.grad_clip, sums=sums)
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema:
        state.ema.update_parameters(state.model)
