"""The loop. `fit()` trains a settled run into its run directory and returns a TrainResult; it prints
nothing itself (`on_epoch` shows each epoch's figures, `log` the rest).

Before it, `settle()` decides what the run trains with and nothing changes it afterwards: the batch
that fits the data and, under time_limit=, the calibrated plan (planning.py) that fixes epochs=auto.
fit() then reads as: a Loop (the state.TrainState, the schedule, the data on the device, the
augmentation), continued from a state.pt when there is one; per epoch, steps (trainer.train_step)
until the StopRules say stop, the epoch's score and metrics row (end_epoch), and RunFiles writing
what a run directory holds. finish() turns the best weights into predictions.
"""
from __future__ import annotations

import contextlib
import errno
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from imgcls import (config, distributed, ensemble, hardware, inference, planning, process, submission, tblog,
                    trainer)
from imgcls.config import Config
from imgcls.data import Prepared
from imgcls.errors import UserError
from imgcls.optim import Schedule
from imgcls.rundir import RunFiles
from imgcls.state import TrainState, empty_sums, sum_counts

Log = Callable[[str], None]


@dataclass
class TrainResult:
    run_dir: Path
    best_val_acc: float
    final_val_acc: float
    best_epoch: int
    epochs_done: int
    stopped: str  # done | time_limit | interrupted | pruned (imgcls tune stopped it after an epoch)
    metrics: list[dict] = field(default_factory=list, repr=False)  # metrics.jsonl's rows
    submission: Path | None = None
    seconds: float = 0.0  # wall time of the run, finish() included
    report: object | None = None  # reporting.Report (its .path is report.html), when imgcls.train wrote one
    report_error: str | None = None  # why the report could not be written (the run itself is complete)
    config: Config | None = field(default=None, repr=False)  # the settled settings the run trained with
    finished_before: bool = False  # the folder held this run finished already: nothing was trained or written


def epoch_line(m: dict) -> str:
    """One epoch's metrics row as the line `imgcls train` prints."""
    val = f" val_loss {m['val_loss']:.4f} val_acc {m['val_acc']:.4f}" if "val_acc" in m else ""
    return (f"epoch {m['epoch']:>3}  train_loss {m['train_loss']:.4f} train_acc {m['train_acc']:.4f}{val}  "
            f"lr {m['lr']:.3g}  {m['seconds']:.1f}s  {m['images_per_second']:.0f} img/s "
            f"(data {m['data_seconds']:.1f}s, model {m['model_seconds']:.1f}s)")


# --- what a run trains with ------------------------------------------------------------------------

@dataclass(frozen=True)
class Settled:
    """A run's settings as it trains them, decided before the first step."""
    cfg: Config  # epochs and aug=auto's preset decided, the batch fitted to the data
    schedule: Schedule
    plan: dict | None = None  # epochs=auto: planning.Plan.to_dict(), saved as plan.json


@dataclass
class Loop:
    """What fit() trains with: the settings, the state, the schedule (a shorter plan replaces it), the
    cache on the device and the augmentation that reads it."""
    cfg: Config
    hw: hardware.Hardware
    ranks: distributed.Ranks
    state: TrainState
    schedule: Schedule
    batch: trainer.Augmenter
    images: torch.Tensor
    labels: np.ndarray
    rows: dict[str, np.ndarray]
    timer: trainer.StepTimer
    tuner: process.ThreadTuner | None = None  # threads=auto on the CPU: finds the fastest thread count
    eval_seconds: float = 0.0

    @property
    def train_rows(self) -> torch.Tensor:
        return torch.as_tensor(self.rows["train"])


def new_loop(settled: Settled, prep: Prepared, rows: dict[str, np.ndarray], images: torch.Tensor,
             hw: hardware.Hardware, ranks: distributed.Ranks, *, tuner: process.ThreadTuner | None = None) -> Loop:
    cfg, schedule = settled.cfg, settled.schedule
    state = TrainState(cfg, prep.dataset.num_classes, hw, ranks, ema_decay=schedule.ema_decay())
    batch = trainer.Augmenter(cfg, images, prep.labels, prep.dataset.num_classes, hw)
    return Loop(cfg, hw, ranks, state, schedule, batch, images, prep.labels, rows, trainer.StepTimer(hw.device), tuner)


def schedule_of(cfg: Config, n_train: int) -> Schedule:
    epochs = 1 if cfg.run.epochs == "auto" else cfg.run.epochs  # epochs=auto: a 1-epoch probe until planned
    return Schedule(epochs, n_train // cfg.run.batch_size, cfg.run.batch_size, cfg.optim, cfg.data)


def fit_batch(cfg: Config, n_train: int, ranks: distributed.Ranks, log: Log) -> Config:
    """A batch larger than the training set becomes the largest power of two that fits (and splits
    evenly over the ranks and accumulation steps); lr= is per 512 images, so it follows."""
    b, split = cfg.run.batch_size, ranks.world * cfg.optim.accum_steps
    if b > n_train:
        fits = max(split, 2 ** int(math.log2(max(1, n_train))) // split * split)
        if fits <= n_train:
            cfg = config.with_values(cfg, batch_size=fits)
            log(f"batch_size={b} is more than the {n_train} training images: training with batch_size={fits} "
                "(lr= is per 512 images, so it follows)")
    distributed.check_batch(cfg.run.batch_size, ranks.world, cfg.optim.accum_steps)
    if n_train < cfg.run.batch_size:
        raise UserError(f"batch_size={cfg.run.batch_size} is larger than the {n_train} training images; "
                        f"set batch_size={2 ** int(math.log2(max(1, n_train)))} or lower.")
    return cfg


class Probe:
    """planning.calibrate's handle on a throwaway copy of the run (same model, data, augmentation and
    device), discarded after timing, so the run itself starts as a fixed-epochs run would."""

    def __init__(self, loop: Loop):
        self.loop, self.state, self.device = loop, loop.state, loop.hw.device
        self.batches = trainer.epoch_batches(loop.state, loop.train_rows, loop.schedule, loop.cfg)
        self.size = loop.schedule.size(0)
        self.n_val, self.n_test = len(loop.rows["val"]), len(loop.rows.get("test", []))

    def step(self) -> bool:
        rows = next(self.batches, None)
        if rows is not None:
            trainer.train_step(self.state, self.loop.batch, rows, schedule=self.loop.schedule, cfg=self.loop.cfg,
                               timer=self.loop.timer)
        return rows is not None

    def score(self) -> dict:
        return score(self.loop)


def settle(cfg: Config, given: frozenset[str], *, prep: Prepared, rows: dict[str, np.ndarray], images: torch.Tensor,
           hw: hardware.Hardware, ranks: distributed.Ranks, files: RunFiles, budget: planning.Budget,
           saved_plan: dict | None, resuming: bool, log: Log) -> Settled:
    """The settings the run trains with: the batch that fits; epochs=auto continues a saved plan or is
    planned by calibrating a throwaway copy of the run within `budget` (rank 0's plan, so all ranks train
    alike); fixed epochs under a limit that would cut them warn."""
    cfg = fit_batch(cfg, len(rows["train"]), ranks, log)
    if cfg.run.epochs == "auto" and saved_plan:  # `epochs=auto` again on a resume: the run's own plan
        cfg = config.with_epochs(cfg, saved_plan["epochs"], given)
        return Settled(cfg, schedule_of(cfg, len(rows["train"])), saved_plan)
    if not budget.limit or (resuming and cfg.run.epochs != "auto"):
        return Settled(cfg, schedule_of(cfg, len(rows["train"])))
    probe_cfg = config.with_epochs(cfg, 1, given) if cfg.run.epochs == "auto" else cfg
    probe = Settled(probe_cfg, schedule_of(probe_cfg, len(rows["train"])))
    timing = planning.calibrate(Probe(new_loop(probe, prep, rows, images, hw, ranks)), files)
    planned = ranks.gather(planning.plan(probe.schedule, timing, limit=budget.limit, elapsed=budget.elapsed()))[0]
    if cfg.run.epochs != "auto":
        if planned.epochs < cfg.run.epochs:
            schedule = schedule_of(cfg, len(rows["train"]))
            share = schedule.lr(planned.epochs * schedule.steps_per_epoch) / schedule.peak
            log(f"warning: time_limit={cfg.run.time_limit} fits about {planned.epochs} of the {cfg.run.epochs} epochs; "
                f"the run would stop with the learning rate at {100 * share:.0f}% of its peak. epochs=auto plans "
                f"the schedule to end within the limit (or set epochs={max(1, planned.epochs)}).")
        return Settled(cfg, schedule_of(cfg, len(rows["train"])))
    if planned.epochs < 1:
        raise UserError(planning.too_short(planned))
    log(planned.line())
    cfg = config.with_epochs(cfg, planned.epochs, given)
    return Settled(cfg, schedule_of(cfg, len(rows["train"])), planned.to_dict())


# --- stop rules ----------------------------------------------------------------------------------

@contextlib.contextmanager
def stop_on_signal(signals=(signal.SIGINT, signal.SIGTERM)):
    """Ctrl-C (SIGINT) or SIGTERM (sent by `docker stop`, Slurm, a notebook's interrupt is SIGINT)
    asks the loop to stop at the next step boundary, where model, optimizer, generators and counters
    agree, so the state saved there resumes exactly. A second signal acts at once (the last checkpoint
    is kept). Yields the list of signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        received.append(signum)
        for s, h in previous.items():
            signal.signal(s, h)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class StopRules:
    """When to stop and when to checkpoint between steps: a signal (Ctrl-C, SIGTERM), the time budget
    (planning.Budget.stop_now: time for the evaluation and finish() is kept), checkpoint_minutes=. The
    ranks agree on every decision, so all stop and checkpoint at the same step (a rank that stopped alone
    would leave the others waiting in the next gradient all-reduce forever). Use as a context: it holds
    the signal handlers."""

    def __init__(self, budget: planning.Budget, *, checkpoint_minutes: float, ranks: distributed.Ranks,
                 n_val: int, n_test: int):
        self.budget, self.every, self.ranks, self.n_val, self.n_test = budget, checkpoint_minutes * 60, ranks, n_val, n_test
        self.stopped, self.last_checkpoint, self._signals = "done", time.time(), []
        self._context = stop_on_signal()

    def __enter__(self) -> "StopRules":
        self._signals = self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def after_step(self, loop: Loop) -> bool:
        """Decide after a step: sets `stopped`; returns whether to checkpoint now. After an epoch's last
        step the evaluation comes next, not another step."""
        now, stopped, sums = time.time(), "done", loop.state.sums
        guess = loop.eval_seconds or sums["seconds"] / max(1, sums["seen"]) * self.n_val  # before the first eval
        step = loop.timer.step_seconds if loop.state.step < loop.schedule.steps_per_epoch else 0.0
        if self._signals:
            stopped = "interrupted"
        elif self.budget.stop_now(step_seconds=step, eval_seconds=guess, n_val=self.n_val, n_test=self.n_test):
            stopped = "time_limit"
        due = bool(self.every and now - self.last_checkpoint > self.every)
        self.stopped, due = self.ranks.agree(stopped, due)
        return self.stopped != "done" or due

    def after_epoch(self, verdict: str | None = None) -> None:
        """A Ctrl-C during the evaluation stops here, as does the caller's verdict on the epoch (on_epoch's
        return, e.g. imgcls tune's pruner): that epoch's state is saved already."""
        self.stopped, _ = self.ranks.agree("interrupted" if self._signals else verdict or "done", False)

    def checkpointed(self) -> None:
        self.last_checkpoint = time.time()


# --- errors that name the setting to change ------------------------------------------------------

def is_out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate memory" in text


@contextlib.contextmanager
def user_errors(cfg: Config, out: Path):
    """Divergence, out-of-memory and a full disk as a UserError that names the setting to change."""
    kept = f"The last checkpoint in {out} is kept: rerun with the same --out (and the changed setting) to resume."
    try:
        yield
    except FloatingPointError as e:
        raise UserError(f"Training diverged: {e}. Lower lr=, set grad_clip=1.0, or amp=off. {kept}") from None
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        b = cfg.run.batch_size
        raise UserError(f"Out of memory ({(str(e).splitlines() or [type(e).__name__])[0][:160]}). Lower "
                        f"batch_size= (e.g. batch_size={max(1, b // 2)}; lr= is per 512 images, so it follows), or "
                        f"keep it and set accum_steps=2; if it ran out while evaluating, lower eval_batch_size= "
                        f"(now {cfg.run.eval_batch_size}); on a GPU, data_on_device=false frees the memory the image "
                        f"cache holds. A smaller image_size= or model= also helps. {kept}") from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(f"The disk is full while writing the run to {out}. Free space there or choose another "
                        f"--out. {kept}") from None


# --- an epoch -------------------------------------------------------------------------------------

def check_finite(loop: Loop) -> float:
    """Mean training loss so far this epoch; NaN/inf raises, so it never reaches a checkpoint. Under fp16
    the mean is over the finite losses: an overflow the scaler skipped is no divergence."""
    state = loop.state
    loop.timer.flush(state.sums)
    mean_loss = float(state.sums["loss"]) / max(1, int(state.sums["finite"]))  # .item(): a CPU-GPU sync point
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"loss is {mean_loss} in epoch {state.epoch + 1} by step {state.step}")
    state.scale.check(state.sums, steps=state.step, epoch=state.epoch)
    return mean_loss


def train_epoch(loop: Loop, rules: StopRules, files: RunFiles) -> None:
    """Steps until the epoch ends or the rules say stop; checkpoints where they say so."""
    from tqdm.auto import tqdm  # progress display

    state, schedule = loop.state, loop.schedule
    bar = tqdm(total=schedule.steps_per_epoch, initial=state.step, desc=f"epoch {state.epoch + 1}/{schedule.epochs}",
               leave=False, disable=not loop.cfg.run.progress or not loop.ranks.is_main, dynamic_ncols=True, unit="step")
    loop.timer.restart()
    for rows in trainer.epoch_batches(state, loop.train_rows, schedule, loop.cfg):
        trainer.train_step(state, loop.batch, rows, schedule=schedule, cfg=loop.cfg, timer=loop.timer)
        if loop.tuner:
            loop.tuner.observe(len(rows), loop.timer.step_seconds)
        bar.update()
        if (state.step - 1) % trainer.CHECK_EVERY == 0 or state.step == schedule.steps_per_epoch:
            loss, sums = check_finite(loop), state.sums
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{float(sums['correct']) / max(1, sums['seen']):.3f}",
                            img_s=f"{sums['seen'] / max(1e-9, sums['seconds']):.0f}",
                            lr=f"{schedule.lr(state.epoch * schedule.steps_per_epoch + state.step - 1):.3g}")
        if rules.after_step(loop):
            check_finite(loop)  # never overwrite the last good checkpoint with NaNs
            files.save_state(state)
            rules.checkpointed()
            loop.timer.restart()
        if rules.stopped != "done":
            break
    bar.close()


def score(loop: Loop) -> dict:
    """val_loss and val_acc of the weights that are saved; none without held-out images. Over several
    ranks each scores every world-th row with rank 0's weights and the sums are reduced, so all ranks
    get the same numbers."""
    rows, ranks, model = loop.rows["val"], loop.ranks, loop.state.eval_model
    if not len(rows):
        return {}
    view = dict(size=config.eval_size(loop.cfg.data), crop=loop.cfg.data.eval_crop, hw=loop.hw,
                batch_size=loop.cfg.run.eval_batch_size)
    if not ranks.active:
        loss, acc = inference.evaluate(model, loop.images, rows, loop.labels, **view)[:2]
        return {"val_loss": loss, "val_acc": acc}
    distributed.sync_state(model, ranks)
    mine = rows[ranks.rank::ranks.world]
    loss, acc = inference.evaluate(model, loop.images, mine, loop.labels, **view)[:2] if len(mine) else (0.0, 0.0)
    loss_sum, correct, n = ranks.sum([loss * len(mine), acc * len(mine), len(mine)])
    return {"val_loss": loss_sum / n, "val_acc": correct / n}


def end_epoch(loop: Loop) -> tuple[dict, bool]:
    """Score the epoch's weights, turn its sums into a metrics row, move the state on to the next epoch.
    Returns (metrics row, whether the score is the best so far)."""
    state = loop.state
    t_eval = time.perf_counter()
    scores = score(loop)
    loop.eval_seconds = time.perf_counter() - t_eval
    sums = sum_counts(state.sums, loop.ranks)  # all ranks' images; the timings are this rank's
    seen, finite = max(1, sums["seen"]), int(sums["finite"])
    m = {"epoch": state.epoch + 1, "train_loss": float(sums["loss"]) / finite if finite else math.nan,
         "train_acc": float(sums["correct"]) / seen, **scores,
         "lr": state.optimizer.param_groups[0]["lr"], "train_images": int(sums["seen"]),  # over all ranks
         "seconds": sums["seconds"] + loop.eval_seconds, "images_per_second": seen / max(1e-9, sums["seconds"]),
         "data_seconds": sums["data"], "model_seconds": sums["model"], "eval_seconds": loop.eval_seconds,
         "image_size": loop.schedule.size(state.epoch), **state.scale.row(sums)}
    if not math.isfinite(m["train_loss"]):
        raise FloatingPointError(f"loss is {m['train_loss']} at the end of epoch {state.epoch + 1}")
    # The same on every rank (the score is reduced over all of them); no held-out images: the last is kept.
    improved = scores["val_acc"] > state.best_acc if scores else True
    if improved:
        state.best_acc, state.best_epoch = scores.get("val_acc", float("nan")), state.epoch + 1
    state.epoch, state.step, state.sums = state.epoch + 1, 0, empty_sums()
    state.epoch_gen_state = state.data_gen.get_state()
    state.finished = state.epoch >= loop.schedule.epochs
    return m, improved


def replan(loop: Loop, files: RunFiles, budget: planning.Budget, m: dict, planned: dict, log: Log) -> None:
    """epochs=auto, at each epoch's end: when the epochs left would not fit at the pace of the one just
    trained (calibration steps can run faster or slower than whole epochs), a shorter schedule ends the
    plan earlier, so the decay still finishes inside the limit; never longer. Rank 0's figures decide for
    every rank. With flat_cos the learning rate of the flat part does not depend on the length, so a
    shorter plan there changes nothing already trained."""
    state, schedule = loop.state, loop.schedule
    left = budget.left() - planned["finish_seconds"]
    pace = m["seconds"] + planned["timing"]["save_seconds"]  # steps + evaluation, and the checkpoint after them
    epochs = loop.ranks.gather(min(schedule.epochs, state.epoch + planning.epochs_left(left, pace)))[0]
    if epochs >= schedule.epochs:
        return
    log(f"replanned: {epochs} epochs instead of {schedule.epochs} (epoch {state.epoch} took {m['seconds']:.0f} s; "
        f"{planning.duration(max(0.0, left))} left before finish)")
    planned.setdefault("replanned", []).append({"after_epoch": state.epoch, "from": schedule.epochs, "epochs": epochs})
    planned.update(epochs=epochs, steps=epochs * schedule.steps_per_epoch)  # `planned` is plan.json's content
    loop.schedule = Schedule(epochs, schedule.steps_per_epoch, schedule.batch_size, schedule.optim, schedule.data)
    state.follow(loop.schedule.ema_decay())
    state.finished = state.epoch >= epochs
    files.save_plan(config.with_values(loop.cfg, epochs=epochs), planned)


# --- the loop ------------------------------------------------------------------------------------

def fit(loop: Loop, files: RunFiles, *, budget: planning.Budget, plan: dict | None, out: Path,
        on_epoch: Callable[[dict], None] | None = None, log: Log = lambda text: None) -> str:
    """Train `loop` (continued from a state.pt already when there was one) until its schedule ends or a
    stop rule stops it; returns how it stopped: done | time_limit | interrupted | pruned. `on_epoch(row)`
    may return "pruned" to stop the run after that epoch."""
    rows, ranks, state = loop.rows, loop.ranks, loop.state
    board = tblog.TensorBoard(out) if loop.cfg.run.tensorboard and ranks.is_main else None
    rules = StopRules(budget, checkpoint_minutes=loop.cfg.run.checkpoint_minutes, ranks=ranks, n_val=len(rows["val"]),
                      n_test=len(rows.get("test", [])))
    state.finished = state.epoch >= loop.schedule.epochs
    with rules, user_errors(loop.cfg, out):
        while not state.finished and rules.stopped == "done":
            train_epoch(loop, rules, files)
            if rules.stopped != "done":
                break
            m, improved = end_epoch(loop)
            if plan and budget.limit and not state.finished:
                replan(loop, files, budget, m, plan, log)  # before the checkpoint: a resume continues it
            files.end_epoch(state, m, improved)
            rules.checkpointed()
            if board:
                board.log(m)
            verdict = on_epoch(m) if on_epoch and ranks.is_main else None  # "pruned": imgcls tune stops the run
            rules.after_epoch(ranks.gather(verdict)[0])
    if board:
        board.close()
    return rules.stopped


def finish(out: Path, prep: Prepared, rows: dict[str, np.ndarray], hw: hardware.Hardware, model: nn.Module,
           cfg: Config, *, images: torch.Tensor | None = None) -> Path | None:
    """Best weights -> validation and test logits on disk, and the submission when there is a test split.
    `images`: the cache as the run placed it (on the GPU when it fits), so it is not copied there again."""
    from imgcls import checkpoint

    checkpoint.load_weights(model, out / "best.safetensors")
    view = dict(size=config.eval_size(cfg.data), crop=cfg.data.eval_crop, hw=hw, batch_size=cfg.run.eval_batch_size)
    images = prep.images if images is None else images
    if len(rows["val"]):  # holdout=none: no held-out images, so no validation predictions
        val_logits = inference.infer(model, images, rows["val"], **view)
        ensemble.save_probs(out / "val_logits.npz", ids=[prep.ids[i] for i in rows["val"]], classes=prep.classes,
                            logits=val_logits, labels=prep.labels[rows["val"]])
    if len(rows.get("test", [])) == 0:
        return None
    test_logits = inference.infer(model, images, rows["test"], **view)
    ids = [prep.ids[i] for i in rows["test"]]
    ensemble.save_probs(out / "test_logits.npz", ids=ids, classes=prep.classes, logits=test_logits)
    preds = dict(zip(ids, test_logits.argmax(1).tolist()))
    return submission.write(prep.dataset, preds, out / "submission.csv")
