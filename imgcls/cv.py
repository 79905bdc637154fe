"""Cross validation, seeded repeats and running jobs one per GPU.

`imgcls cv`: the labelled splits are merged, cut into K stratified folds (seeded), and one
ordinary run directory is trained per fold (`DIR/fold-k/`, via `train.fit(rows=...)`). The
held-out predictions of the folds together cover every labelled image once: the out-of-fold
(OOF) file `DIR/oof.npz`. `DIR/cv.json` holds per-fold and OOF accuracy; the folds' test
probabilities are averaged into `DIR/submission.csv`.

`imgcls train ... seeds=1,2,3`: the same config once per seed into `RUN/seed-<s>/`, summarized
in `RUN/seeds.json` (mean +- std of final and best validation accuracy).

Every job writes `outcome.json` beside its run; a job whose outcome is `done` is skipped when
the command is run again, so a failed fold or seed is rerun alone. Unfinished runs resume
from their own `state.pt` (fit() does that by itself).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
import traceback
from dataclasses import dataclass
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


# --- folds ---------------------------------------------------------------------------------

def stratified_folds(labels: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """Fold index in [0, k) for each label: scikit-learn's StratifiedKFold, shuffled with `seed`.

    Each class is spread over the folds as evenly as it divides (counts differ by at most one)."""
    from sklearn.model_selection import StratifiedKFold

    if k < 2:
        raise UserError(f"--folds must be at least 2, got {k}.")
    counts = np.bincount(labels)
    small = [c for c in np.flatnonzero(counts) if counts[c] < k]
    if small:
        raise UserError(f"{len(small)} class(es) have fewer labelled images than the {k} folds "
                        f"(e.g. class {small[0]} has {counts[small[0]]}); every fold needs each class in its "
                        f"validation part. Use --folds {max(2, int(counts[np.flatnonzero(counts)].min()))} or fewer.")
    fold = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold[held] = f
    return fold


@dataclass
class Plan:
    """Which labelled cache row belongs to which fold; saved as DIR/folds.json (by sample id)."""
    out: Path
    k: int
    seed: int
    rows: np.ndarray  # labelled cache rows (train + val of the dataset)
    fold: np.ndarray  # [len(rows)] fold index
    test: np.ndarray  # test cache rows (may be empty)

    def fold_dir(self, f: int) -> Path:
        return self.out / f"fold-{f}"

    def fold_rows(self, f: int) -> dict[str, np.ndarray]:
        return {"train": self.rows[self.fold != f], "val": self.rows[self.fold == f], "test": self.test}


def make_plan(prep: Prepared, out: str | Path, *, k: int, seed: int) -> Plan:
    """Merge train+val, make the folds, and check them against DIR/folds.json from an earlier run."""
    out = Path(out)
    rows = np.sort(np.concatenate([prep.rows["train"], prep.rows.get("val", np.empty(0, np.int64))]))
    fold = stratified_folds(prep.labels[rows], k, seed=seed)
    ids = [prep.ids[i] for i in rows]
    record = {"k": k, "seed": seed, "ids": ids, "fold": fold.tolist()}
    saved_file = out / "folds.json"
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        if saved != record:
            raise UserError(f"{out} holds folds made from other data, --folds or seed= (it has k={saved['k']}, "
                            f"seed={saved['seed']}, {len(saved['ids'])} labelled images; this command makes "
                            f"k={k}, seed={seed}, {len(ids)}). Choose a new --out, or repeat the first command's "
                            "settings.")
    else:
        out.mkdir(parents=True, exist_ok=True)
        saved_file.write_text(json.dumps(record))
    return Plan(out, k, seed, rows, fold, prep.rows.get("test", np.empty(0, np.int64)))


# --- one job: fit() into a run directory, with its outcome on disk --------------------------

def read_outcome(run_dir: Path) -> dict | None:
    path = Path(run_dir) / OUTCOME
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(run_dir: Path) -> bool:
    outcome = read_outcome(run_dir)
    return bool(outcome and outcome["status"] == "done")


def train_job(cfg: Config, prep: Prepared, out: Path, *, rows: dict[str, np.ndarray] | None = None,
              on_epoch: Callable[[dict], None] | None = None) -> dict:
    """fit() into `out` and write `out/outcome.json`; an exception is caught and recorded as a failure
    (with the traceback in `out/error.txt`) so the other folds or seeds still run."""
    from imgcls import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTCOME).unlink(missing_ok=True)
    t0 = time.time()
    try:
        result = train.fit(cfg, prep, out, rows=rows, on_epoch=on_epoch)
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


def with_seed(cfg: Config, seed: int) -> Config:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed, seeds=()))


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


# --- summaries --------------------------------------------------------------------------------

def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def collect_cv(prep: Prepared, plan: Plan) -> dict:
    """Out-of-fold file, fold-ensemble submission and DIR/cv.json from finished folds."""
    import torch

    from imgcls import predict, submission

    ids = [prep.ids[i] for i in plan.rows]
    parts = [predict.load_probs(plan.fold_dir(f) / "val_logits.npz") for f in range(plan.k)]
    for f, part in enumerate(parts):
        expected = {ids[j] for j in np.flatnonzero(plan.fold == f)}
        if set(part.ids) != expected:
            raise UserError(f"{plan.fold_dir(f)}/val_logits.npz does not hold fold {f}'s images; "
                            f"delete {plan.fold_dir(f)} and rerun this fold.")
    merged = predict.Probs(ids=[i for p in parts for i in p.ids], classes=prep.classes,
                           probs=torch.cat([p.probs for p in parts]), logits=torch.cat([p.logits for p in parts]),
                           labels=np.concatenate([p.labels for p in parts]))
    oof = merged.take(ids)  # in the dataset's order, matched by id
    labels = prep.labels[plan.rows]
    if not (oof.labels == labels).all():
        raise UserError(f"The labels saved in {plan.out}/fold-*/val_logits.npz differ from the dataset's: the data "
                        "changed since the folds were trained. Choose a new --out.")
    correct = oof.probs.argmax(1).numpy() == labels
    oof.save(plan.out / "oof.npz", fold=plan.fold)
    per_fold = []
    for f in range(plan.k):
        outcome = read_outcome(plan.fold_dir(f))
        held = plan.fold == f
        per_fold.append({"fold": f, "run": plan.fold_dir(f).name, "val_images": int(held.sum()),
                         "acc": float(correct[held].mean()), "best_epoch": outcome["best_epoch"],
                         "final_val_acc": outcome["final_val_acc"], "seconds": outcome["seconds"]})
    result = {"folds": plan.k, "seed": plan.seed, "labelled_images": len(ids), "classes": prep.classes,
              "per_fold": per_fold, "fold_acc": mean_std([p["acc"] for p in per_fold]),
              "oof_acc": float(correct.mean()),
              "oof_loss": float(-np.log(np.clip(oof.probs.numpy()[np.arange(len(ids)), labels], 1e-12, None)).mean()),
              "submission": None}
    if len(plan.test):
        test_ids = [prep.ids[i] for i in plan.test]
        members = [predict.load_probs(plan.fold_dir(f) / "test_logits.npz").take(test_ids) for f in range(plan.k)]
        probs, preds = predict.ensemble([m.probs for m in members], method="mean")
        predict.Probs(ids=test_ids, classes=prep.classes, probs=probs).save(plan.out / "test_probs.npz")
        path = submission.write(prep.dataset, dict(zip(test_ids, preds.tolist())), plan.out / "submission.csv")
        result["submission"] = path.name
    (plan.out / "cv.json").write_text(json.dumps(result, indent=2))
    return result


def summarize_seeds(out: Path, seeds: tuple[int, ...]) -> dict:
    """RUN/seeds.json: each seed's outcome and mean +- std of its final and best val accuracy."""
    runs = [{"seed": s, "run": f"seed-{s}", **read_outcome(out / f"seed-{s}")} for s in seeds]
    summary = {"seeds": list(seeds), "runs": runs,
               "final_val_acc": mean_std([r["final_val_acc"] for r in runs]),
               "best_val_acc": mean_std([r["best_val_acc"] for r in runs])}
    (out / "seeds.json").write_text(json.dumps(summary, indent=2))
    return summary
