"""The training loop. `fit()` trains one model into a run directory and returns a TrainResult; it
prints nothing itself (the caller passes `on_epoch` to show each epoch's figures).

The loop reads as: build a Trainer (imgcls/trainer.py: the state and the step), continue it from a
state.pt when there is one (`resume`), then per epoch take steps until the StopRules say stop
(signals, time_limit=, checkpoint_minutes=, agreed over the ranks), score the epoch, and let
RunFiles write what a run directory holds. finish() turns the best weights into predictions.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

import imgcls
from imgcls import (checkpoint, config, data, distributed, ensemble, finetune, hardware, inference, optim, planning,
                    submission, tblog, tmpfiles)
from imgcls.config import Config
from imgcls.data import Prepared
from imgcls.errors import UserError
from imgcls.trainer import CHECK_EVERY, Trainer, place_images


@dataclass
class TrainResult:
    run_dir: Path
    best_val_acc: float
    final_val_acc: float
    best_epoch: int
    epochs_done: int
    stopped: str  # done | time_limit | interrupted
    metrics: list[dict] = field(default_factory=list, repr=False)  # metrics.jsonl's rows
    submission: Path | None = None
    seconds: float = 0.0  # wall time of fit(), finish() included
    report: object | None = None  # reporting.Report (its .path is report.html), when imgcls.train wrote one
    report_error: str | None = None  # why the report could not be written (the run itself is complete)
    config: Config | None = field(default=None, repr=False)  # the resolved settings the run trained with


def epoch_line(m: dict) -> str:
    """One epoch's metrics row as the line `imgcls train` prints."""
    val = f" val_loss {m['val_loss']:.4f} val_acc {m['val_acc']:.4f}" if "val_acc" in m else ""
    return (f"epoch {m['epoch']:>3}  train_loss {m['train_loss']:.4f} train_acc {m['train_acc']:.4f}{val}  "
            f"lr {m['lr']:.3g}  {m['seconds']:.1f}s  {m['images_per_second']:.0f} img/s "
            f"(data {m['data_seconds']:.1f}s, model {m['model_seconds']:.1f}s)")


def manifest(cfg: Config, prep: Prepared, rows: dict[str, np.ndarray], hw: hardware.Hardware, *,
             pretrained: dict | None = None, mean_std: dict | None = None) -> dict:
    """`pretrained`: what init= loaded (finetune.load_init); `mean_std`: the input normalization when not ImageNet's."""
    init = cfg.model.init
    if init and not pretrained:
        pretrained = {"path": str(Path(init).resolve()), "sha256": checkpoint.sha256(Path(init))}
    return {
        "imgcls": imgcls.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(hw.device) if hw.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "seed": cfg.run.seed,
        "data": {"root": str(prep.dataset.root.resolve()), "layout": prep.dataset.layout,
                 "fingerprint": prep.fingerprint, "images": {k: int(len(v)) for k, v in rows.items()},
                 "skipped": len(prep.skipped), "skipped_files": prep.skipped},
        "holdout": cfg.data.holdout,  # none: train = train + validation, no validation score, last weights kept
        "classes": prep.classes,
        **({"subset": subset_record(cfg, prep, rows)} if cfg.data.subset else {}),
        "pretrained": pretrained or False,
        **({"mean_std": mean_std} if mean_std else {}),
        "external_data": False,  # only files under data.root were read
    }


def subset_record(cfg: Config, prep: Prepared, rows: dict[str, np.ndarray]) -> dict:
    """subset=: what a subset run trained and validated on, so it is never mistaken for a full one."""
    return {"setting": cfg.data.subset, "images_before": prep.before_subset,
            "per_class": {k: data.per_class(v, prep.labels, len(prep.classes)) for k, v in rows.items() if k != "test"},
            "note": "trained and validated on a subset of the labelled images (subset=); the test split is whole"}


# --- stop rules ----------------------------------------------------------------------------------

def stop_reserve(*, eval_seconds: float, step_seconds: float, n_val: int, n_test: int, limit: float,
                 report: float = 0.0) -> float:
    """Seconds to keep in hand under time_limit= when deciding whether to take another step: that
    step, the epoch-end evaluation that may follow it, finish() (validation + test inference with
    the best weights), the `report` written after it, and 10% of the limit, at most a minute, for
    loading weights, writing files and a slow disk (finish() on a 5-image test split took 0.4 s more
    than its inference here)."""
    per_image = eval_seconds / max(1, n_val)
    return step_seconds + eval_seconds + per_image * (n_val + n_test) + report + min(60.0, 0.1 * limit)


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
    """When to stop and when to checkpoint between steps: a signal (Ctrl-C, SIGTERM), time_limit=
    (keeping time for the evaluation and finish()), checkpoint_minutes=. The ranks agree on every
    decision, so all stop and checkpoint at the same step (a rank that stopped alone would leave the
    others waiting in the next gradient all-reduce forever). Use as a context: it holds the signal
    handlers."""

    def __init__(self, cfg: Config, *, started: float, ranks: distributed.Ranks, n_val: int, n_test: int):
        self.limit = config.parse_duration(cfg.run.time_limit)
        self.every = cfg.run.checkpoint_minutes * 60
        self.started, self.ranks, self.n_val, self.n_test = started, ranks, n_val, n_test
        self.stopped, self.last_checkpoint, self._signals = "done", time.time(), []
        self._context = stop_on_signal()

    def __enter__(self) -> "StopRules":
        self._signals = self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def after_step(self, trainer: Trainer) -> bool:
        """Decide after a step: sets `stopped`; returns whether to checkpoint now."""
        now, stopped = time.time(), "done"
        sums = trainer.sums
        guess = trainer.eval_seconds or sums["seconds"] / max(1, sums["seen"]) * self.n_val  # before the first eval
        if self._signals:
            stopped = "interrupted"
        elif self.limit and now - self.started > self.limit - stop_reserve(
                eval_seconds=guess, step_seconds=trainer.step_seconds, n_val=self.n_val, n_test=self.n_test,
                limit=self.limit, report=planning.REPORT_SECONDS):
            stopped = "time_limit"
        due = bool(self.every and now - self.last_checkpoint > self.every)
        self.stopped, due = self.ranks.agree(stopped, due)
        return self.stopped != "done" or due

    def after_epoch(self) -> None:
        """A Ctrl-C during the evaluation stops here: that epoch's state is saved already."""
        self.stopped, _ = self.ranks.agree("interrupted" if self._signals else "done", False)

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


# --- the run directory ---------------------------------------------------------------------------

class RunFiles:
    """What a run directory holds, written by rank 0 alone (every method is a no-op on other ranks, but
    save_state, which all ranks call: it gathers their generators)."""

    def __init__(self, out: Path, ranks: distributed.Ranks):
        self.out, self.ranks, self.metrics = out, ranks, []
        self.main = ranks.is_main

    def start(self, cfg: Config, prep: Prepared, rows: dict[str, np.ndarray], hw: hardware.Hardware, *,
              trainer: Trainer | None = None) -> None:
        if self.main:
            tmpfiles.remove_stale(self.out)  # half-written checkpoints of a killed run
            processes = {"processes": self.ranks.world} if self.ranks.active else {}
            loaded = {"pretrained": trainer.pretrained, "mean_std": trainer.mean_std} if trainer else {}
            checkpoint.write_text(self.out / "config.yaml", config.to_yaml(cfg))
            checkpoint.write_text(self.out / "manifest.json",
                                  json.dumps({**manifest(cfg, prep, rows, hw, **loaded), **processes}, indent=2))
            checkpoint.write_text(self.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))

    def save_state(self, trainer: Trainer) -> None:
        state = trainer.state_dict()
        if self.main:
            checkpoint.save_state(state, self.out / "state.pt")

    def save_weights_and_state(self, trainer: Trainer) -> None:
        """What an epoch end writes, to throwaway files: the planner times it."""
        state = trainer.state_dict()
        if self.main:
            for name, write in ((".calibration.pt", lambda p: checkpoint.save_state(state, p)),
                                (".calibration.safetensors", lambda p: checkpoint.save_weights(trainer.eval_model, p))):
                write(self.out / name)
                (self.out / name).unlink()

    def save_plan(self, cfg: Config, plan: dict | str | None) -> None:
        """epochs=auto: the planned epochs (and aug=auto's preset) go into config.yaml, so a resume
        continues the same schedule; plan.json keeps the figures behind them (Plan.to_dict(), or the
        text of a resumed run's plan.json; None: it is there already)."""
        if self.main:
            checkpoint.write_text(self.out / "config.yaml", config.to_yaml(cfg))
            if plan is not None:
                checkpoint.write_text(self.out / "plan.json", plan if isinstance(plan, str) else json.dumps(plan, indent=2))

    def end_epoch(self, trainer: Trainer, m: dict, improved: bool) -> None:
        self.metrics.append(m)
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            checkpoint.save_weights(trainer.eval_model, self.out / "last.safetensors")
            if improved:
                checkpoint.save_weights(trainer.eval_model, self.out / "best.safetensors")
        self.save_state(trainer)


def resume_source(cfg: Config, out: str | Path) -> Path | None:
    """The run directory to continue from: --out itself when it holds a state.pt (the newest progress
    of this run), else resume=RUN; None for a fresh run."""
    if (Path(out) / "state.pt").is_file():
        return Path(out)
    if not cfg.run.resume:
        return None
    source = Path(cfg.run.resume).expanduser()
    source = source.parent if source.is_file() else source
    if not (source / "state.pt").is_file():
        raise UserError(f"resume={cfg.run.resume}: there is no state.pt in {source}. Give the --out folder of an "
                        "earlier `imgcls train` run (it writes state.pt at every epoch end).")
    return source


def resume(trainer: Trainer, files: RunFiles, source: Path) -> None:
    """Continue `trainer` from source/state.pt (a finished run resumes too: it only redoes finish()),
    with the metrics of the epochs that state has finished; a run continued into another --out gets
    the source's weights files."""
    state = checkpoint.load_state(source / "state.pt")
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"{source / 'state.pt'} does not fit this model and settings ({str(e).splitlines()[0][:200]}). "
                        f"Resume with the settings it was trained with (they are read from {source / 'config.yaml'}; "
                        "do not override model=, width= or ema=), or choose a new --out.") from None
    lines = (source / "metrics.jsonl").read_text().splitlines()[:trainer.epoch]  # a kill can leave one more, or half
    files.metrics = [json.loads(line) for line in lines]
    if source != files.out and files.main:
        for name in ("best.safetensors", "last.safetensors"):
            if (source / name).is_file():
                checkpoint.write_bytes(files.out / name, (source / name).read_bytes())


# --- before the first step: the batch and the plan -------------------------------------------------

def fit_batch(cfg: Config, n_train: int, ranks: distributed.Ranks, log: Callable[[str], None]) -> None:
    """A batch larger than the training set becomes the largest power of two that fits (and splits
    evenly over the ranks and accumulation steps); lr= is per 512 images, so it follows."""
    b, split = cfg.run.batch_size, ranks.world * cfg.optim.accum_steps
    if b > n_train:
        fits = 2 ** int(math.log2(max(1, n_train)))
        fits = max(split, fits // split * split)
        if fits <= n_train:
            cfg.run.batch_size = fits
            log(f"batch_size={b} is more than the {n_train} training images: training with batch_size={fits} "
                "(lr= is per 512 images, so it follows)")
    distributed.check_batch(cfg.run.batch_size, ranks.world, cfg.optim.accum_steps)


def plan_run(trainer: Trainer, files: RunFiles, rules: StopRules, log: Callable[[str], None]) -> dict | None:
    """time_limit=: calibrate, then with epochs=auto fix the epochs to fit (rank 0's plan, so all ranks
    train alike) and return the plan (planning.Plan.to_dict()); with fixed epochs, warn when the limit would
    cut the schedule."""
    timing = planning.calibrate(trainer, files)
    planned = planning.plan(trainer, timing, limit=rules.limit, elapsed=time.time() - rules.started)
    planned = trainer.ranks.gather(planned)[0]
    cfg = trainer.cfg
    if cfg.run.epochs != "auto":
        if planned.epochs < cfg.run.epochs:
            stop = planned.epochs * trainer.steps_per_epoch
            share = optim.lr_at(stop, total=trainer.total_steps, warmup=trainer.warmup, peak=trainer.peak,
                                cfg=cfg.optim) / trainer.peak
            log(f"warning: time_limit={cfg.run.time_limit} fits about {planned.epochs} of the {cfg.run.epochs} epochs; "
                f"the run would stop with the learning rate at {100 * share:.0f}% of its peak. epochs=auto plans "
                f"the schedule to end within the limit (or set epochs={max(1, planned.epochs)}).")
        return None
    if planned.epochs < 1:
        raise UserError(planning.too_short(planned))
    trainer.set_epochs(planned.epochs)
    saved = planned.to_dict()
    files.save_plan(cfg, saved)
    log(planned.line())
    return saved


def replan(trainer: Trainer, files: RunFiles, rules: StopRules, m: dict, planned: dict,
           log: Callable[[str], None]) -> None:
    """epochs=auto, at each epoch's end: when the epochs left would not fit at the pace of the one just
    trained (calibration steps can run faster or slower than whole epochs), end the plan earlier, so the
    decay still finishes inside the limit; never longer. Rank 0's figures decide for every rank. With
    flat_cos the learning rate of the flat part does not depend on the length, so a shorter plan there
    changes nothing already trained."""
    left = rules.limit - (time.time() - rules.started) - planned["finish_seconds"]
    pace = m["seconds"] + planned["timing"]["save_seconds"]  # steps + evaluation, and the checkpoint after them
    epochs = min(trainer.epochs, trainer.epoch + int(max(0.0, left) // pace))
    epochs = trainer.ranks.gather(epochs)[0]
    if epochs >= trainer.epochs:
        return
    log(f"replanned: {epochs} epochs instead of {trainer.epochs} (epoch {trainer.epoch} took {m['seconds']:.0f} s; "
        f"{planning.duration(max(0.0, left))} left before finish)")
    planned.setdefault("replanned", []).append({"after_epoch": trainer.epoch, "from": trainer.epochs, "epochs": epochs})
    planned.update(epochs=epochs, steps=epochs * trainer.steps_per_epoch)  # `planned` is plan.json's content
    trainer.set_epochs(epochs)
    files.save_plan(trainer.cfg, planned)


# --- the loop ------------------------------------------------------------------------------------

def train_epoch(trainer: Trainer, rules: StopRules, files: RunFiles) -> None:
    """Steps until the epoch ends or the rules say stop; checkpoints where they say so."""
    from tqdm.auto import tqdm  # progress display

    cfg = trainer.cfg
    bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.step, desc=f"epoch {trainer.epoch + 1}/{trainer.epochs}",
               leave=False, disable=not cfg.run.progress or not trainer.ranks.is_main, dynamic_ncols=True, unit="step")
    for batch_rows in trainer.batches():
        trainer.train_step(batch_rows)
        bar.update()
        if (trainer.step - 1) % CHECK_EVERY == 0 or trainer.step == trainer.steps_per_epoch:
            loss, sums = trainer.check_finite(), trainer.sums
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{float(sums['correct']) / max(1, sums['seen']):.3f}",
                            img_s=f"{sums['seen'] / max(1e-9, sums['seconds']):.0f}", lr=f"{trainer.lr:.3g}")
        if rules.after_step(trainer):
            trainer.check_finite()  # never overwrite the last good checkpoint with NaNs
            files.save_state(trainer)
            rules.checkpointed()
        if rules.stopped != "done":
            break
    bar.close()


def fit(cfg: Config, prep: Prepared, out: str | Path, *, rows: dict[str, np.ndarray] | None = None,
        on_epoch: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None,
        started: float | None = None, ranks: distributed.Ranks | None = None) -> TrainResult:
    """Train into `out`, continuing from its state.pt (or resume=RUN's) when there is one.
    `on_epoch(metrics row)` after each epoch, `log(line)` for what else is worth saying (the plan, a
    smaller batch, what init= loaded). `started`: wall time (time.time()) that time_limit= counts from; default now.
    `ranks`: this process's place in a torchrun data-parallel run (distributed.init); default one process."""
    t0 = time.time()
    cfg = copy.deepcopy(cfg)  # the plan and a smaller batch are this run's own, not its caller's
    out, rows, ranks, log = Path(out), rows or prep.rows, ranks or distributed.Ranks(), log or (lambda text: None)
    out.mkdir(parents=True, exist_ok=True)
    hw = hardware.resolve(cfg.run)
    fit_batch(cfg, len(rows["train"]), ranks, log)
    trainer = Trainer(cfg, prep, rows, hw, ranks)
    if trainer.pretrained and ranks.is_main:
        log(finetune.init_line(trainer.pretrained, trainer.num_classes))
    files = RunFiles(out, ranks)
    source = resume_source(cfg, out)
    saved_plan = (source / "plan.json").read_text() if source and (source / "plan.json").is_file() else None
    auto, planned = cfg.run.epochs == "auto", None
    if auto and saved_plan:  # `epochs=auto` again on a resume: the run's own plan
        planned = json.loads(saved_plan)
        trainer.set_epochs(planned["epochs"])
    if source:
        resume(trainer, files, source)
    files.start(cfg, prep, rows, hw, trainer=trainer)
    if saved_plan:
        files.save_plan(cfg, None if source == out else saved_plan)
    board = tblog.TensorBoard(out) if cfg.run.tensorboard and ranks.is_main else None
    trainer.images = place_images(prep, hw, cfg.run.data_on_device)
    rules = StopRules(cfg, started=started or t0, ranks=ranks, n_val=len(rows["val"]), n_test=len(rows.get("test", [])))
    if rules.limit and (cfg.run.epochs == "auto" or not source):
        planned = plan_run(trainer, files, rules, log)
    with rules, user_errors(cfg, out):
        while not trainer.finished and rules.stopped == "done":
            train_epoch(trainer, rules, files)
            if rules.stopped != "done":
                break
            m, improved = trainer.end_epoch()
            if auto and rules.limit and planned and not trainer.finished:
                replan(trainer, files, rules, m, planned, log)  # before the checkpoint: a resume continues it
            files.end_epoch(trainer, m, improved)
            rules.checkpointed()
            if board:
                board.log(m)
            if on_epoch and ranks.is_main:
                on_epoch(m)
            rules.after_epoch()
    if board:
        board.close()
    metrics = files.metrics
    result = TrainResult(out, trainer.best_acc, metrics[-1].get("val_acc", float("nan")) if metrics else float("nan"),
                         trainer.best_epoch, len(metrics), rules.stopped, metrics, config=cfg)
    if rules.stopped != "interrupted" and ranks.is_main and (out / "best.safetensors").is_file():
        with user_errors(cfg, out):
            result.submission = finish(out, prep, rows, hw, trainer.eval_model, cfg, images=trainer.images)
    result.seconds = time.time() - t0
    return result


def finish(out: Path, prep: Prepared, rows: dict[str, np.ndarray], hw: hardware.Hardware, model: nn.Module,
           cfg: Config, *, images: torch.Tensor | None = None) -> Path | None:
    """Best weights -> validation and test logits on disk, and the submission when there is a test split.
    `images`: the cache as fit() placed it (on the GPU when it fits), so it is not copied there again."""
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
