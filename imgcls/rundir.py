"""A run directory (`--out RUN`): who may write it, what it holds (written by rank 0 alone), and
continuing from it.

A folder imgcls writes into is owned: `claim()` takes it only when it is missing, empty, or an imgcls
folder of the same kind (a train run, a seeds= folder, a cv folder, a check or demo folder), and holds
an exclusive lock on it (fcntl.flock on imgcls.lock, which also records the kind) for the whole
command, so a second process is refused with the PID that holds it; the OS drops the lock when the
process dies, so kill -9 never leaves a stale one. A run that continues in its own folder is bound to
what it trained: `check_bound()` refuses other data or settings that change what is learned.

config.yaml (the settled settings), manifest.json (versions, device, data fingerprint, what init=
loaded), metrics.jsonl (a row per epoch), best/last.safetensors, state.pt (state.TrainState),
plan.json (epochs=auto's figures), outcome.json (how the run ended). Every file is written
atomically (tmpfiles.write_bytes).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import socket
import time
from pathlib import Path

import numpy as np
import torch

import imgcls
from imgcls import checkpoint, config, data, distributed, hardware, tmpfiles
from imgcls.config import Config
from imgcls.data import Prepared
from imgcls.errors import UserError
from imgcls.state import TrainState

OUTCOME = "outcome.json"
MARKER = "imgcls.lock"  # the lock file; its JSON says which kind of folder this is and who holds it
KINDS = {"train": "an `imgcls train` run", "seeds": "a seeds= folder (one run per seed)",
         "cv": "an `imgcls cv` folder", "check": "an `imgcls check --out` folder", "demo": "an `imgcls demo` folder",
         "tune": "an `imgcls tune` folder"}
# Settings that change where and how fast a run goes and what it logs, not what it learns: a run or a
# seeds/cv folder may be continued with other values of these.
RERUN_MAY_CHANGE = {"device", "progress", "eval_batch_size", "data_on_device", "decode_workers", "cache_dir",
                    "time_limit", "checkpoint_minutes", "compile", "seeds", "tensorboard", "resume", "threads"}


# --- owning a folder ---------------------------------------------------------------------------

def kind_of(folder: Path) -> str | None:
    """Which kind of imgcls folder `folder` is (its marker, or for folders written before the marker,
    their files); None when it is not one."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads((folder / MARKER).read_text())["kind"]
    if (folder / "folds.json").is_file():
        return "cv"
    if (folder / "seeds.json").is_file() or any(folder.glob(f"seed-*/{OUTCOME}")):
        return "seeds"
    if (folder / "state.pt").is_file() or ((folder / "manifest.json").is_file() and (folder / "config.yaml").is_file()):
        return "train"
    return None


def check_owned(folder: Path, kind: str) -> None:
    """Refuse a folder imgcls must not write into, before a byte is written."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file, not a folder: give a folder for {KINDS[kind]}.")
    # imgcls's own temp files (tmpfiles.PATTERN: a killed run's half-written checkpoint) are no one else's
    others = [p for p in folder.iterdir() if not tmpfiles.PATTERN.match(p.name)] if folder.is_dir() else []
    if not others:
        return
    found = kind_of(folder)
    if found is None:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in others)
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise UserError(f"--out {folder} already holds files imgcls did not write ({shown}), and imgcls would "
                        f"overwrite some of them. Give a new or empty folder, or a subfolder such as "
                        f"{folder / ('run' if kind == 'train' else kind)}.")
    if found != kind:
        raise UserError(f"--out {folder} is {KINDS[found]}, not {KINDS[kind]}: give a new folder (or a subfolder "
                        f"such as {folder / kind}).")


def mark(folder: Path, kind: str) -> None:
    """Make `folder` (checked as claim() would) an imgcls folder of `kind` without locking it: a group
    writes a child's spec and log there before the child claims it."""
    check_owned(folder, kind)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        (folder / MARKER).write_text(json.dumps({"kind": kind}))


@contextlib.contextmanager
def claim(folder: str | Path, kind: str):
    """Own `folder` for the block: check it (check_owned), create it, and hold its lock. A second process
    gets a one-line error naming the PID that holds it."""
    folder = Path(folder)
    check_owned(folder, kind)
    existed, empty = folder.exists(), not folder.exists() or not any(folder.iterdir())
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = {}
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        os.close(fd)
        raise UserError(f"{folder} is in use: process {holder.get('pid', '?')} on {holder.get('host', 'this machine')} "
                        f"is writing it (started {holder.get('started', '?')}). Wait for it to end, stop it, or "
                        "choose another --out.") from None
    except ImportError:  # no fcntl (Windows): owned, not locked
        pass
    try:
        mark = {"kind": kind, "pid": os.getpid(), "host": socket.gethostname(), "imgcls": imgcls.__version__,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mark).encode(), 0)
        yield folder
    except BaseException:
        if empty and [p.name for p in folder.iterdir()] == [MARKER]:  # refused before writing: leave it as it was
            (folder / MARKER).unlink()
            if not existed:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock


def learned_settings(cfg: Config) -> dict:
    """Bare key -> value of every setting that changes what a run learns."""
    return {k: v for section in cfg.to_dict().values() for k, v in section.items() if k not in RERUN_MAY_CHANGE}


def changed_settings(saved: Config, cfg: Config) -> list[str]:
    """`key: old -> new` for each learned setting that differs (epochs=auto matches any planned epochs)."""
    old, new = learned_settings(saved), learned_settings(cfg)
    skip = {"epochs"} if cfg.run.epochs == "auto" else set()
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if k not in skip and old.get(k) != new[k]]


def check_bound(folder: Path, cfg: Config, prep: Prepared) -> None:
    """A run continued in its own folder without resume= trains what it trained: the same data and the
    same learned settings; anything else is refused, naming what differs and the two ways on."""
    saved_file, manifest_file = folder / "config.yaml", folder / "manifest.json"
    if not (saved_file.is_file() and manifest_file.is_file()):
        return
    saved = json.loads(manifest_file.read_text())["data"]
    differences = changed_settings(config.resolve(file=saved_file), cfg)
    if saved.get("identity", prep.identity) != prep.identity or saved.get("layout") != prep.dataset.layout:
        differences.insert(0, f"data: {saved.get('root')} -> {prep.dataset.root.resolve()} (other images)")
    if differences:
        raise UserError(f"{folder} is a run of other data or settings ({'; '.join(differences)}), so continuing it "
                        f"would mix two trainings. Choose another --out for a new run, or add "
                        f"{shlex.quote(f'resume={folder}')} to "
                        "continue this run's weights with the new data or settings on purpose.")


def manifest(cfg: Config, prep: Prepared, rows: dict[str, np.ndarray], hw: hardware.Hardware, *,
             pretrained: dict | None = None, mean_std: dict | None = None) -> dict:
    """`pretrained`: what init= loaded (finetune.load_init); `mean_std`: the input normalization when not ImageNet's."""
    init = cfg.model.init
    if init and not pretrained:
        pretrained = {"path": str(Path(init).resolve()), "sha256": checkpoint.sha256(Path(init))}
    return {
        "imgcls": imgcls.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": hardware.device_name(hw.device),
        "seed": cfg.run.seed,
        "data": {"root": str(prep.dataset.root.resolve()), "layout": prep.dataset.layout,
                 "fingerprint": prep.fingerprint, "identity": prep.identity, "images": {k: int(len(v)) for k, v in rows.items()},
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


class RunFiles:
    """What a run directory holds, written by rank 0 alone (every method is a no-op on other ranks, but
    save_state, which all ranks call: it gathers their generators)."""

    def __init__(self, out: Path, ranks: distributed.Ranks):
        self.out, self.ranks, self.metrics = Path(out), ranks, []
        self.main = ranks.is_main

    def start(self, cfg: Config, prep: Prepared, rows: dict[str, np.ndarray], hw: hardware.Hardware,
              state: TrainState) -> None:
        if self.main:
            tmpfiles.remove_stale(self.out)  # half-written checkpoints of a killed run
            processes = {"processes": self.ranks.world} if self.ranks.active else {}
            loaded = {"pretrained": state.pretrained, "mean_std": state.mean_std}
            tmpfiles.write_text(self.out / "config.yaml", config.to_yaml(cfg))
            tmpfiles.write_text(self.out / "manifest.json",
                                json.dumps({**manifest(cfg, prep, rows, hw, **loaded), **processes}, indent=2))
            tmpfiles.write_text(self.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))

    def save_state(self, state: TrainState) -> None:
        saved = state.state_dict()
        if self.main:
            checkpoint.save_state(saved, self.out / "state.pt")

    def save_weights_and_state(self, state: TrainState) -> None:
        """What an epoch end writes, to throwaway files: the planner times it."""
        saved = state.state_dict()
        if self.main:
            for name, write in ((".calibration.pt", lambda p: checkpoint.save_state(saved, p)),
                                (".calibration.safetensors", lambda p: checkpoint.save_weights(state.eval_model, p))):
                write(self.out / name)
                (self.out / name).unlink()

    def save_plan(self, cfg: Config, plan: dict | str) -> None:
        """epochs=auto: the settings with the planned epochs go into config.yaml, so a resume continues the
        same schedule; plan.json keeps the figures behind them (Plan.to_dict(), or a resumed run's text)."""
        if self.main:
            tmpfiles.write_text(self.out / "config.yaml", config.to_yaml(cfg))
            tmpfiles.write_text(self.out / "plan.json", plan if isinstance(plan, str) else json.dumps(plan, indent=2))

    def end_epoch(self, state: TrainState, m: dict, improved: bool) -> None:
        self.metrics.append(m)
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            checkpoint.save_weights(state.eval_model, self.out / "last.safetensors")
            if improved:
                checkpoint.save_weights(state.eval_model, self.out / "best.safetensors")
        self.save_state(state)

    def outcome(self, outcome: dict) -> None:
        if self.main:
            tmpfiles.write_text(self.out / OUTCOME, json.dumps(outcome, indent=2))


def read_outcome(run_dir: Path) -> dict | None:
    path = Path(run_dir) / OUTCOME
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(run_dir: Path) -> bool:
    outcome = read_outcome(run_dir)
    return bool(outcome and outcome["status"] == "done")


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


def resume(state: TrainState, files: RunFiles, source: Path) -> None:
    """Continue `state` from source/state.pt (a finished run resumes too: it only redoes finish()), with
    the metrics of the epochs that state has finished; a run continued into another --out gets the
    source's weights files."""
    saved = checkpoint.load_state(source / "state.pt")
    try:
        state.load_state_dict(saved)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"{source / 'state.pt'} does not fit this model and settings ({str(e).splitlines()[0][:200]}). "
                        f"Resume with the settings it was trained with (they are read from {source / 'config.yaml'}; "
                        "do not override model=, width= or ema=), or choose a new --out.") from None
    lines = (source / "metrics.jsonl").read_text().splitlines()[:state.epoch]  # a kill can leave one more, or half
    files.metrics = [json.loads(line) for line in lines]
    if source != files.out and files.main:
        for name in ("best.safetensors", "last.safetensors"):
            if (source / name).is_file():
                tmpfiles.write_bytes(files.out / name, (source / name).read_bytes())
