"""Spend the time you have: with `epochs=auto time_limit=T`, fix the number of epochs so that the warmup
and the decay end, and finish() (validation, test inference, the report) completes, inside T.

No trainer we compare with plans for a wall-clock budget: timm, fastai and Lightning's max_time stop
when the time is up, with the learning rate wherever the schedule was (a run cut at epoch 20 of 200
submits weights trained at 98% of the peak learning rate). Here a calibration measures this run on
its own data and device (CALIBRATION_STEPS real training steps at the first epoch's image size, one
evaluation, one checkpoint write), then puts every weight, optimizer buffer and random stream back
as it was, so the planned run is exactly the fixed-`epochs=` run it chose (same weights on the CPU
with deterministic=true), just sized to the budget. Without epochs=auto the same estimate only warns
when time_limit= would cut the schedule.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from imgcls import optim

CALIBRATION_STEPS = 20  # timed steps; the first 2 (kernel set-up, compilation) are not counted
# Calibration steps and whole epochs do not run at the same pace: food-10 at 96 px on a 2-core Xeon
# (2026-12-02, BENCHMARKS.md "epochs=auto") calibrated 98 ms a step (the median of 12) and trained at
# 114-124 ms, so a plan for 15 epochs was cut after 11 at the peak learning rate. The plan uses the mean
# step (slow steps count), and training.replan() shortens it at an epoch's end when the epochs left no
# longer fit at the pace of the last one.
REPORT_SECONDS = 5.0  # the report after finish(): 1.6 s for food-10, 4.1 s for tiny-imagenet-100 on 2 CPU cores


@dataclass
class Timing:
    step_seconds: float  # one optimizer step at `size` px (mean of the calibration steps)
    size: int
    eval_seconds: float  # one evaluation of the validation split
    save_seconds: float  # one epoch-end checkpoint (state + weights)
    n_val: int
    n_test: int
    calibration_seconds: float  # what measuring cost, out of the budget


@dataclass
class Plan:
    epochs: int
    steps: int
    train_seconds: float  # planned steps + evaluations + checkpoints
    finish_seconds: float  # kept for finish(), the report and a margin
    limit: float
    elapsed: float  # of the limit, before the first step: decoding the cache, building the model, calibrating
    one_epoch: float  # seconds of one epoch
    timing: Timing

    def line(self) -> str:
        t = self.timing
        return (f"planned {self.epochs} epochs = {duration(self.train_seconds)} ({self.steps} steps of "
                f"{1000 * t.step_seconds:.0f} ms at {t.size} px, {t.eval_seconds:.1f} s per evaluation); finish "
                f"{duration(self.finish_seconds)} within time_limit={duration(self.limit)}")

    def to_dict(self) -> dict:
        return asdict(self)


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a CPU clock means nothing until the GPU is done


def calibrate(trainer, files) -> Timing:
    """Time CALIBRATION_STEPS steps, one evaluation and one checkpoint of `trainer` on its data and
    device, then restore it exactly (weights, optimizer, EMA, generators, counters)."""
    t0 = time.perf_counter()
    saved = copy.deepcopy(trainer.state_dict())
    size, times = trainer.size, []
    for _, rows in zip(range(CALIBRATION_STEPS + 2), trainer.batches()):
        t = time.perf_counter()
        trainer.train_step(rows)
        _sync(trainer.hw.device)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    trainer.score()
    eval_seconds = time.perf_counter() - t
    t = time.perf_counter()
    files.save_weights_and_state(trainer)
    save_seconds = time.perf_counter() - t
    trainer.load_state_dict(saved)
    step = statistics.fmean(times[2:] or times)  # the mean: slow steps count
    return Timing(step, size, eval_seconds, save_seconds, len(trainer.rows["val"]), len(trainer.rows.get("test", [])),
                  time.perf_counter() - t0)


def finish_seconds(timing: Timing, limit: float) -> float:
    """finish() scores validation and test with the best weights, then the report; and 10% of the limit
    (at most a minute) for loading weights, writing files and a slow disk, as StopRules keeps."""
    per_image = timing.eval_seconds / max(1, timing.n_val)
    return per_image * (timing.n_val + timing.n_test) + REPORT_SECONDS + min(60.0, 0.1 * limit)


def cost(epochs: int, timing: Timing, trainer) -> float:
    """Seconds `epochs` epochs take: steps at each epoch's size (time ~ pixels, from the calibrated
    size), an evaluation and a checkpoint per epoch."""
    d = trainer.cfg.data
    total = 0.0
    for e in range(epochs):
        side = optim.size_at(e, epochs=epochs, size=d.image_size, scale=d.prog_scale, end=d.prog_end)
        total += trainer.steps_per_epoch * timing.step_seconds * (side / timing.size) ** 2
    return total + epochs * (timing.eval_seconds + timing.save_seconds)


def fitting_epochs(timing: Timing, trainer, available: float) -> int:
    """The most epochs whose cost fits in `available` seconds (0 if not even one); cost grows with
    the epoch count, so a doubling then bisection search finds it."""
    if cost(1, timing, trainer) > available:
        return 0
    lo, hi = 1, 2
    while cost(hi, timing, trainer) <= available:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid, timing, trainer) <= available else (lo, mid)
    return lo


def plan(trainer, timing: Timing, *, limit: float, elapsed: float) -> Plan:
    """The plan for what is left of `limit` after `elapsed` seconds (the calibration included)."""
    finish = finish_seconds(timing, limit)
    epochs = fitting_epochs(timing, trainer, limit - elapsed - finish)
    return Plan(epochs, epochs * trainer.steps_per_epoch, cost(epochs, timing, trainer) if epochs else 0.0,
                finish, limit, elapsed, cost(1, timing, trainer), timing)


def too_short(p: Plan) -> str:
    """Why no epoch fits, and what to change."""
    return (f"time_limit={duration(p.limit)} leaves {duration(max(0.0, p.limit - p.elapsed - p.finish_seconds))} for "
            f"training after the set-up ({duration(p.elapsed)}) and the {duration(p.finish_seconds)} kept for finish(), "
            f"but one epoch takes about {duration(p.one_epoch)} here. Raise time_limit=, or make an epoch cheaper "
            "(a smaller image_size=, model= or batch of data).")
