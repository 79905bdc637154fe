"""Spend the time you have: with `epochs=auto time_limit=T`, fix the number of epochs so that the warmup
and the decay end, and finish() (validation, test inference, the report) completes, inside T.

No trainer we compare with plans for a wall-clock budget: timm, fastai and Lightning's max_time stop
when the time is up, with the learning rate wherever the schedule was (a run cut at epoch 20 of 200
submits weights trained at 98% of the peak learning rate). Here a calibration measures this run on
its own data and device (CALIBRATION_STEPS real training steps at the first epoch's image size, one
evaluation, one checkpoint write) on a throwaway copy of the run, then the run starts afresh with the
settled epochs, so the planned run is exactly the fixed-`epochs=` run it chose (same weights on the CPU
with deterministic=true), just sized to the budget. Without epochs=auto the same estimate only warns
when time_limit= would cut the schedule.

This module is the one time model: the plan, the stop rule (Budget.stop_now), the shares of a
`seeds=` or `imgcls cv` command (Budget.share) and `imgcls check`'s estimate (cost) all use it.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from imgcls.optim import Schedule

CALIBRATION_STEPS = 20  # timed steps; the first 2 (kernel set-up, compilation) are not counted
# Calibration steps and whole epochs do not run at the same pace: food-10 at 96 px on a 2-core Xeon
# (2026-12-02, BENCHMARKS.md "epochs=auto") calibrated 98 ms a step (the median of 12) and trained at
# 114-124 ms, so a plan for 15 epochs was cut after 11 at the peak learning rate. The plan uses the mean
# step (slow steps count), and training.replan() shortens it at an epoch's end when the epochs left no
# longer fit at the pace of the last one.
# Epochs are planned this much slower than calibrated, so a run a little slower than its calibration still
# ends its decay before the stop rule keeps the time for finish(); a much slower one is replanned.
PACE_MARGIN = 0.05
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


@dataclass(frozen=True)
class Budget:
    """The wall time one run may take: `limit` seconds (0 = none) from `started` (time.time()). A plain
    `imgcls train` counts from the call, decoding the cache included; a seed of `seeds=` or a fold of
    `imgcls cv` gets its share of what the whole command has left when it starts (share())."""
    started: float
    limit: float

    @classmethod
    def of(cls, time_limit: str, started: float | None = None) -> "Budget":
        from imgcls.config import parse_duration

        return cls(time.time() if started is None else started, parse_duration(time_limit))

    def elapsed(self) -> float:
        return time.time() - self.started

    def left(self) -> float:
        return self.limit - self.elapsed() if self.limit else float("inf")

    def share(self, runs: int) -> "Budget":
        """One of `runs` runs still to come, one after another, that must all end within this budget."""
        if not self.limit:
            return Budget(time.time(), 0.0)
        return Budget(time.time(), max(0.0, self.left()) / max(1, runs))

    def stop_now(self, *, step_seconds: float, eval_seconds: float, n_val: int, n_test: int) -> bool:
        """Whether to stop before the next step: what must still run (that step, the evaluation, finish()
        and the report) would not end inside the limit."""
        reserve = stop_reserve(eval_seconds=eval_seconds, step_seconds=step_seconds, n_val=n_val, n_test=n_test,
                               limit=self.limit, report=REPORT_SECONDS)
        return bool(self.limit) and self.elapsed() > self.limit - reserve


def margin(limit: float) -> float:
    """Kept in hand under a time limit for loading weights, writing files and a slow disk: 10% of the
    limit, at most a minute (finish() on a 5-image test split took 0.4 s more than its inference here)."""
    return min(60.0, 0.1 * limit)


def stop_reserve(*, eval_seconds: float, step_seconds: float, n_val: int, n_test: int, limit: float,
                 report: float = 0.0) -> float:
    """Seconds to keep in hand under time_limit= when deciding whether to take another step: that
    step, the epoch-end evaluation that may follow it, finish() (validation + test inference with
    the best weights), the `report` written after it, and the margin."""
    per_image = eval_seconds / max(1, n_val)
    return step_seconds + eval_seconds + per_image * (n_val + n_test) + report + margin(limit)


def calibrate(probe, files) -> Timing:
    """Time CALIBRATION_STEPS steps, one evaluation and one checkpoint of `probe` (training.Probe: a
    throwaway copy of the run on its data and device, discarded afterwards, so the run itself starts
    exactly as a fixed-epochs run would)."""
    t0 = time.perf_counter()
    times = []
    for _ in range(CALIBRATION_STEPS + 2):
        t = time.perf_counter()
        if not probe.step():
            break
        _sync(probe.device)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    probe.score()
    eval_seconds = time.perf_counter() - t
    t = time.perf_counter()
    files.save_weights_and_state(probe.state)
    save_seconds = time.perf_counter() - t
    step = statistics.fmean(times[2:] or times)  # the mean: slow steps count
    return Timing(step, probe.size, eval_seconds, save_seconds, probe.n_val, probe.n_test, time.perf_counter() - t0)


def finish_seconds(timing: Timing, limit: float) -> float:
    """finish() scores validation and test with the best weights, then the report, and the margin, as
    Budget.stop_now keeps."""
    per_image = timing.eval_seconds / max(1, timing.n_val)
    return per_image * (timing.n_val + timing.n_test) + REPORT_SECONDS + margin(limit)


def cost(epochs: int, timing: Timing, schedule: Schedule) -> float:
    """Seconds `epochs` epochs of `schedule` take: steps at each epoch's size (time ~ pixels, from the
    calibrated size), an evaluation and a checkpoint per epoch."""
    length = dataclasses.replace(schedule, epochs=epochs)
    total = sum(schedule.steps_per_epoch * timing.step_seconds * (length.size(e) / timing.size) ** 2
                for e in range(epochs))
    return total + epochs * (timing.eval_seconds + timing.save_seconds)


def fitting_epochs(timing: Timing, schedule: Schedule, available: float) -> int:
    """The most epochs whose cost fits in `available` seconds (0 if not even one); cost grows with
    the epoch count, so a doubling then bisection search finds it."""
    if cost(1, timing, schedule) > available:
        return 0
    lo, hi = 1, 2
    while cost(hi, timing, schedule) <= available:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid, timing, schedule) <= available else (lo, mid)
    return lo


def plan(schedule: Schedule, timing: Timing, *, limit: float, elapsed: float) -> Plan:
    """The plan for what is left of `limit` after `elapsed` seconds (the calibration included). Epochs
    are planned PACE_MARGIN slower than calibrated, so a run a little slower than its calibration still
    ends its schedule before the stop rule (Budget.stop_now) would cut it."""
    finish = finish_seconds(timing, limit)
    epochs = fitting_epochs(timing, schedule, (limit - elapsed - finish) / (1 + PACE_MARGIN))
    return Plan(epochs, epochs * schedule.steps_per_epoch, cost(epochs, timing, schedule) if epochs else 0.0,
                finish, limit, elapsed, cost(1, timing, schedule), timing)


def epochs_left(left: float, pace: float) -> int:
    """Whole epochs of `pace` seconds (the last epoch's steps, evaluation and checkpoint) that fit in `left`,
    with the same PACE_MARGIN as plan()."""
    return int(max(0.0, left) // (pace * (1 + PACE_MARGIN)))


def too_short(p: Plan) -> str:
    """Why no epoch fits, and what to change."""
    return (f"time_limit={duration(p.limit)} leaves {duration(max(0.0, p.limit - p.elapsed - p.finish_seconds))} for "
            f"training after the set-up ({duration(p.elapsed)}) and the {duration(p.finish_seconds)} kept for finish(), "
            f"but one epoch takes about {duration(p.one_epoch)} here. Raise time_limit=, or make an epoch cheaper "
            "(a smaller image_size=, model= or batch of data).")
