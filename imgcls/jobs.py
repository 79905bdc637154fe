"""Jobs: whole trainings (a fold of `imgcls cv`, a seed of `seeds=`) run one after another in this
process, or one child process per GPU when there are several.

Every job writes `outcome.json` beside its run; a job whose outcome is `done` is skipped when the
command is run again, so a failed fold or seed is rerun alone. Unfinished runs resume from their
own `state.pt` (fit() does that by itself).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from imgcls import config
from imgcls.config import Config
from imgcls.data import Prepared
from imgcls.errors import UserError

OUTCOME = "outcome.json"
# Settings that may change between the first run of a cv/seeds command and a rerun of its
# failed jobs: they change where and how fast a job runs and what it logs, not what it learns.
RERUN_MAY_CHANGE = {"device", "progress", "eval_batch_size", "data_on_device", "decode_workers", "cache_dir",
                    "time_limit", "checkpoint_minutes", "compile", "seeds", "tensorboard"}

Log = Callable[[str], None]


def read_outcome(run_dir: Path) -> dict | None:
    path = Path(run_dir) / OUTCOME
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(run_dir: Path) -> bool:
    outcome = read_outcome(run_dir)
    return bool(outcome and outcome["status"] == "done")


def train_job(cfg: Config, prep: Prepared, out: Path, *, rows: dict[str, np.ndarray] | None = None,
              on_epoch: Callable[[dict], None] | None = None, log: Log | None = None) -> dict:
    """fit() into `out` and write `out/outcome.json`; an exception is caught and recorded as a failure
    (with the traceback in `out/error.txt`) so the other folds or seeds still run."""
    from imgcls import training

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTCOME).unlink(missing_ok=True)
    t0 = time.time()
    try:
        result = training.fit(cfg, prep, out, rows=rows, on_epoch=on_epoch, log=log)
        outcome = {"status": "done" if result.stopped == "done" else result.stopped,
                   "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch,
                   "final_val_acc": result.final_val_acc, "epochs": result.epochs_done}
    except Exception as e:  # noqa: BLE001 - one failed job must not stop the others; it is reported
        (out / "error.txt").write_text(traceback.format_exc())
        outcome = {"status": "failed", "error": f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)}
    outcome["seconds"] = round(time.time() - t0, 1)
    (out / OUTCOME).write_text(json.dumps(outcome, indent=2))
    return outcome


def check_rerun_settings(saved: Path, cfg: Config) -> None:
    """A rerun that finishes some folds/seeds must train them like the first run did."""
    if not saved.is_file():
        return
    old = {k: v for section in config.resolve(file=saved).to_dict().values() for k, v in section.items()}
    new = {k: v for section in cfg.to_dict().values() for k, v in section.items()}
    changed = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k not in RERUN_MAY_CHANGE and old.get(k) != new[k]]
    if changed:
        raise UserError(f"{saved.parent} was started with other settings ({'; '.join(changed)}), so finished and "
                        "new runs would not be comparable. Repeat the first settings, or choose a new --out.")


def outcome_line(name: str, run_dir: Path, o: dict) -> str:
    if o["status"] == "failed":
        return f"{name}: FAILED after {o['seconds']:.0f}s: {o['error']} (traceback in {run_dir / 'error.txt'})"
    return (f"{name}: {o['status']}, best val_acc {o['best_val_acc']:.4f} at epoch {o['best_epoch']}, "
            f"final val_acc {o['final_val_acc']:.4f}, {o['seconds']:.0f}s")


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


# --- running jobs one per GPU ----------------------------------------------------------------

def visible_gpus() -> list[str]:
    """CUDA device ids this process may use, as CUDA_VISIBLE_DEVICES entries for the children."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()][:n]
    return [str(i) for i in range(n)]


def run_parallel(jobs: list[tuple[list[str], Path]], gpus: list[str], *,
                 on_start: Callable[[int, str], None] | None = None, poll_seconds: float = 2.0) -> list[int]:
    """Run each (argv, log file) as a subprocess, at most one per GPU at a time, the child seeing only
    its GPU (CUDA_VISIBLE_DEVICES). Output goes to the log. Returns exit codes in job order.

    Processes, not threads or DDP: each fold/seed is an independent run, so nothing is shared and
    one that fails (e.g. out of memory) leaves the others running."""
    if not gpus:
        raise ValueError("run_parallel needs at least one GPU id")
    pending = list(range(len(jobs)))
    running: dict[str, tuple[int, subprocess.Popen, object]] = {}
    codes: list[int] = [-1] * len(jobs)
    try:
        while pending or running:
            for gpu in gpus:
                if gpu not in running and pending:
                    i = pending.pop(0)
                    argv, log = jobs[i]
                    Path(log).parent.mkdir(parents=True, exist_ok=True)
                    handle = open(log, "w")
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                    running[gpu] = (i, subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env), handle)
                    if on_start:
                        on_start(i, gpu)
            time.sleep(poll_seconds)
            for gpu, (i, proc, handle) in list(running.items()):
                if proc.poll() is not None:
                    codes[i] = proc.returncode
                    handle.close()
                    del running[gpu]
    finally:
        for i, proc, handle in running.values():  # interrupted: stop the children we started
            proc.terminate()
            proc.wait()
            handle.close()
    return codes


def run_jobs(names: list[str], dirs: list[Path], cfg: Config, *, train_one: Callable[[int], dict],
             child_argv: Callable[[int], list[str]], log: Log) -> dict[str, dict]:
    """Train each job: one subprocess per visible GPU when there are several (CUDA_VISIBLE_DEVICES=that
    GPU, output in DIR/log.txt), else train_one(i) one after the other in this process.
    Returns name -> outcome; logs one line per job."""
    gpus = visible_gpus() if cfg.run.device != "cpu" else []
    outcomes = {}
    if len(gpus) > 1 and len(names) > 1:
        def started(i, gpu):
            log(f"{names[i]}: started on GPU {gpu}, log {dirs[i] / 'log.txt'}")
        run_parallel([(child_argv(i), dirs[i] / "log.txt") for i in range(len(names))], gpus, on_start=started)
        for name, d in zip(names, dirs):
            outcomes[name] = read_outcome(d) or {"status": "failed", "error": f"it exited early; see {d / 'log.txt'}"}
            log(outcome_line(name, d, outcomes[name]))
        return outcomes
    for i, (name, d) in enumerate(zip(names, dirs)):
        log(f"--- {name} ({i + 1}/{len(names)}): {d}")
        outcomes[name] = train_one(i)
        log(outcome_line(name, d, outcomes[name]))
        if outcomes[name]["status"] == "interrupted":
            break
    return outcomes
