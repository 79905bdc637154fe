"""A group of runs: the seeds of `seeds=` and the folds of `imgcls cv`. Each is an ordinary run
(run.run: its own folder, report, logs, manifest and outcome.json), trained one after another in this
process, or one child process per GPU when there are several (`python -m imgcls.worker SPEC`: the
child calls run.run itself, and never imports the user's script).

`open_group` is what both commands do first: own the group folder for the whole command and refuse a
rerun that would change what is learned. A run whose outcome is `done` is skipped when the command
is run again, so a failed one is rerun alone; an unfinished one resumes from its own state.pt.

time_limit= is for the whole command: each run gets an equal share of what is left when it starts
(planning.Budget.share), so every run of an `epochs=auto` group plans its schedule to end inside its
share, and the last one ends inside the limit.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from imgcls import config, rundir, tmpfiles
from imgcls.config import Config
from imgcls.errors import UserError
from imgcls.run import RunSpec
from imgcls.rundir import read_outcome

Log = Callable[[str], None]


def check_rerun_settings(saved: Path, cfg: Config) -> None:
    """A rerun that finishes some folds/seeds must train them like the first run did."""
    if not saved.is_file():
        return
    changed = rundir.changed_settings(config.resolve(file=saved), cfg)
    if changed:
        raise UserError(f"{saved.parent} was started with other settings ({'; '.join(changed)}), so finished and "
                        "new runs would not be comparable. Repeat the first settings, or choose a new --out.")


@contextlib.contextmanager
def open_group(out: Path, kind: str, cfg: Config):
    """Own the group folder `out` (rundir.claim) for the block, check a rerun's settings against the first
    run's, and save the settings the group trains with."""
    with rundir.claim(out, kind):
        check_rerun_settings(out / "config.yaml", cfg)
        tmpfiles.write_text(out / "config.yaml", config.to_yaml(cfg))
        yield


def outcome_line(name: str, run_dir: Path, o: dict) -> str:
    if o["status"] == "failed":
        return f"{name}: FAILED after {o.get('seconds', 0):.0f}s: {o['error']} (traceback in {run_dir / 'error.txt'})"
    return (f"{name}: {o['status']}, best val_acc {o['best_val_acc']:.4f} at epoch {o['best_epoch']}, "
            f"final val_acc {o['final_val_acc']:.4f}, {o['seconds']:.0f}s")


@dataclass(frozen=True)
class Job:
    name: str  # "seed 3", "fold 2": how the logs call it
    spec: RunSpec

    @property
    def dir(self) -> Path:
        return Path(self.spec.out)


def train_one(job: Job, *, prep=None, log: Log, on_epoch=None) -> dict:
    """run.run() in this process; its outcome.json, or a failure recorded here when it was refused before
    it could write one (another process holds its folder, say). One failed run never stops the others."""
    from imgcls import run

    t0 = time.time()
    try:
        run.run(job.spec, prep=prep, log=log, on_epoch=on_epoch)
    except Exception as e:  # noqa: BLE001 - recorded, and the other runs go on
        outcome = read_outcome(job.dir)
        if outcome and outcome["status"] == "failed":
            return outcome
        return {"status": "failed", "error": str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}",
                "seconds": round(time.time() - t0, 1)}
    return read_outcome(job.dir)


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
                 on_start: Callable[[int, str], None] | None = None, on_end: Callable[[int, int], None] | None = None,
                 poll_seconds: float = 2.0) -> list[int]:
    """Run each (argv, log file) as a subprocess, at most one per GPU at a time, the child seeing only
    its GPU (CUDA_VISIBLE_DEVICES). Output goes to the log; on_end(i, exit status) as soon as one ends.
    Returns exit codes in job order.

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
                    if on_end:
                        on_end(i, proc.returncode)
    finally:
        for i, proc, handle in running.values():  # interrupted: stop the children we started
            proc.terminate()
            proc.wait()
            handle.close()
    return codes


def run_jobs(jobs: list[Job], cfg: Config, *, after: int = 0, prep=None, log: Log,
             on_epoch: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Train each job: one child process per visible GPU when there are several (output in DIR/log.txt),
    else one after another in this process. Each job's budget is its share of the time left, counting
    `after` more runs that follow the group (cv's refit). Returns name -> outcome; logs a line per job."""
    gpus = visible_gpus() if cfg.run.device != "cpu" else []
    outcomes = {}
    if len(gpus) > 1 and len(jobs) > 1:
        waves = math.ceil(len(jobs) / len(gpus))
        argv = []
        for i, job in enumerate(jobs):  # the i-th job starts in wave i // len(gpus)
            spec = replace(job.spec, runs_left=waves - i // len(gpus) + after,
                           cfg=config.with_values(job.spec.cfg, progress=False))
            rundir.mark(job.dir, "train")
            tmpfiles.write_text(job.dir / "spec.json", spec.to_json())
            argv.append(([sys.executable, "-m", "imgcls.worker", str(job.dir / "spec.json")], job.dir / "log.txt"))
        def ended(i: int, code: int) -> None:  # said at once, while the others train on
            job = jobs[i]
            outcomes[job.name] = read_outcome(job.dir) or {
                "status": "failed", "error": f"it exited with status {code} before writing its outcome; see "
                                             f"{job.dir / 'log.txt'}"}
            log(outcome_line(job.name, job.dir, outcomes[job.name]))

        run_parallel(argv, gpus, on_end=ended, on_start=lambda i, gpu: log(f"{jobs[i].name}: started on GPU {gpu}, "
                                                                           f"log {jobs[i].dir / 'log.txt'}"))
        return {job.name: outcomes[job.name] for job in jobs}
    for i, job in enumerate(jobs):
        log(f"--- {job.name} ({i + 1}/{len(jobs)}): {job.dir}")
        job = replace(job, spec=replace(job.spec, runs_left=len(jobs) - i + after))
        outcomes[job.name] = train_one(job, prep=prep, log=log, on_epoch=on_epoch)
        log(outcome_line(job.name, job.dir, outcomes[job.name]))
        if outcomes[job.name]["status"] == "interrupted":
            break
    return outcomes
