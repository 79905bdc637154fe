"""Cross validation, `imgcls cv`: the labelled splits are merged, cut into K stratified folds
(seeded), and one ordinary run is trained per fold (`DIR/fold-k/`, run.run with the fold's rows,
one per GPU when there are several: imgcls/jobs.py). The held-out
predictions of the folds together cover every labelled image once: the out-of-fold (OOF) file
`DIR/oof.npz`. `DIR/cv.json` holds per-fold and OOF accuracy; the folds' test probabilities are
averaged into `DIR/submission.csv`. A rerun trains only the folds that have not finished.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from imgcls import config, data, jobs, planning, reporting, run, rundir, tmpfiles
from imgcls.data import Prepared
from imgcls.errors import UserError


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
        fewest = int(counts[np.flatnonzero(counts)].min())
        advice = (f"Use --folds {fewest} or fewer." if fewest >= 2 else
                  f"Class {int(np.flatnonzero(counts == fewest)[0])} has a single labelled image, so no fold count "
                  "works: add images to it (or remove the class), or train with `imgcls train` and a held-out "
                  "split instead.")
        raise UserError(f"{len(small)} class(es) have fewer labelled images than the {k} folds "
                        f"(e.g. class {small[0]} has {counts[small[0]]}); every fold needs each class in its "
                        f"validation part. {advice}")
    fold = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold[held] = f
    return fold


@dataclass
class Folds:
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


def make_folds(prep: Prepared, out: str | Path, *, k: int, seed: int) -> Folds:
    """Merge train+val, make the folds, and check them against DIR/folds.json from an earlier run."""
    out = Path(out)
    rows = data.labelled(prep.rows)
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
        tmpfiles.write_text(saved_file, json.dumps(record))
    return Folds(out, k, seed, rows, fold, prep.rows.get("test", np.empty(0, np.int64)))


# --- summaries --------------------------------------------------------------------------------

def collect_cv(prep: Prepared, plan: Folds) -> dict:
    """Out-of-fold file, fold-ensemble submission and DIR/cv.json from finished folds."""
    import torch

    from imgcls import ensemble, submission

    ids = [prep.ids[i] for i in plan.rows]
    parts = [ensemble.load_probs(plan.fold_dir(f) / "val_logits.npz") for f in range(plan.k)]
    for f, part in enumerate(parts):
        expected = {ids[j] for j in np.flatnonzero(plan.fold == f)}
        if set(part.ids) != expected:
            raise UserError(f"{plan.fold_dir(f)}/val_logits.npz does not hold fold {f}'s images; "
                            f"delete {plan.fold_dir(f)} and rerun this fold.")
    merged = ensemble.Probs(ids=[i for p in parts for i in p.ids], classes=prep.classes,
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
        outcome = rundir.read_outcome(plan.fold_dir(f))
        held = plan.fold == f
        per_fold.append({"fold": f, "run": plan.fold_dir(f).name, "val_images": int(held.sum()),
                         "acc": float(correct[held].mean()), "best_epoch": outcome["best_epoch"],
                         "final_val_acc": outcome["final_val_acc"], "seconds": outcome["seconds"]})
    result = {"folds": plan.k, "seed": plan.seed, "labelled_images": len(ids), "classes": prep.classes,
              "per_fold": per_fold, "fold_acc": reporting.spread([p["acc"] for p in per_fold]),
              "oof_acc": float(correct.mean()),
              "oof_loss": float(-np.log(np.clip(oof.probs.numpy()[np.arange(len(ids)), labels], 1e-12, None)).mean()),
              "submission": None}
    if len(plan.test):
        test_ids = [prep.ids[i] for i in plan.test]
        members = [ensemble.load_probs(plan.fold_dir(f) / "test_logits.npz").take(test_ids) for f in range(plan.k)]
        probs, preds = ensemble.ensemble([m.probs for m in members], method="mean")
        ensemble.Probs(ids=test_ids, classes=prep.classes, probs=probs).save(plan.out / "test_probs.npz")
        path = submission.write(prep.dataset, dict(zip(test_ids, preds.tolist())), plan.out / "submission.csv")
        result["submission"] = path.name
    tmpfiles.write_text(plan.out / "cv.json", json.dumps(result, indent=2))
    return result


# --- the whole command ----------------------------------------------------------------------------

@dataclass
class CvResult:
    out: Path
    folds: int
    trained: list[int] = field(default_factory=list)  # folds trained by this call
    kept: list[int] = field(default_factory=list)  # folds finished by an earlier call, not retrained
    failed: list[int] = field(default_factory=list)  # asked-for folds that did not finish
    missing: list[int] = field(default_factory=list)  # folds of the cv not finished yet (cv.json waits for them)
    interrupted: bool = False
    per_fold: list[dict] = field(default_factory=list)  # fold, val_images, acc, best_epoch, ...
    fold_acc: dict | None = None  # mean, std (sample), n over the folds
    oof_acc: float | None = None  # accuracy of the out-of-fold predictions on every labelled image
    oof_loss: float | None = None
    labelled_images: int = 0
    oof: Path | None = None  # oof.npz
    summary: Path | None = None  # cv.json
    submission: Path | None = None  # mean of the folds' test probabilities
    report: object | None = None  # reporting.Report (its .path is report.html)
    report_error: str | None = None
    refit: dict | None = None  # --refit: run, epochs, and its outcome
    submission_from: str = "folds"  # folds (mean of their test probabilities) | refit


def settings(out: Path, resolve: Callable[[dict | None], config.Resolved]) -> config.Resolved:
    """The settings of a cv directory: a rerun takes the first run's (DIR/config.yaml) as its
    defaults, so unfinished folds train like the others; resolve(defaults) applies the rest."""
    rundir.check_owned(out, "cv")  # before reading its config.yaml: a folder of the user's own is refused
    saved = out / "config.yaml"
    resolved = resolve(config.load_yaml(saved) if saved.is_file() else None)
    if resolved.cfg.run.resume:
        raise UserError("resume= does not apply to cv: rerun the same `imgcls cv` command, which resumes "
                        "unfinished folds and skips finished ones.")
    if resolved.cfg.run.seeds:
        raise UserError("seeds= repeats `imgcls train`; cv trains every fold with seed= (which also cuts the folds).")
    return resolved


def run_cv(data_root: str | Path, out: str | Path, resolved: config.Resolved, *, budget: planning.Budget,
           folds: int | None = None, only: list[int] | None = None, log: jobs.Log,
           on_epoch: Callable[[dict], None] | None = None, refit: bool = False, submit: str | None = None) -> CvResult:
    """Train the folds of `out` not finished yet (`only`: just these), then, once all are, collect
    the OOF file, cv.json and the fold-mean submission. `folds`: K, default the saved K or 5.
    `refit`: then one holdout=none run on every labelled image for the folds' mean best epoch count
    (out/refit/); `submit`: which one out/submission.csv comes from (default: refit when there is one).
    The folds and the refit share `budget`."""
    submit = submit or ("refit" if refit else "folds")
    if submit not in ("folds", "refit") or (submit == "refit" and not refit):
        raise UserError(f"--submit {submit}: choose folds, or refit together with --refit.")
    out, cfg = Path(out), resolved.cfg
    folds_file = out / "folds.json"
    k = folds or (json.loads(folds_file.read_text())["k"] if folds_file.is_file() else 5)
    with jobs.open_group(out, "cv", cfg):
        prep = data.prepare(data_root, cfg, progress=cfg.run.progress)
        plan = make_folds(prep, out, k=k, seed=cfg.run.seed)
        log(prep.dataset.describe())
        log(f"{k} stratified folds (seed {cfg.run.seed}) over {len(plan.rows)} labelled images "
            f"(train + val merged), about {len(plan.rows) // k} held out per fold")
        chosen = list(only) if only else list(range(k))
        bad = [f for f in chosen if not 0 <= f < k]
        if bad:
            raise UserError(f"--fold {bad[0]} is not a fold of {out}: folds are 0..{k - 1}.")
        result = CvResult(out, k, kept=[f for f in chosen if rundir.is_done(plan.fold_dir(f))])
        if result.kept:
            log(f"fold(s) {', '.join(map(str, result.kept))} already finished: kept")
        result.trained = [f for f in chosen if f not in result.kept]
        todo = [jobs.Job(f"fold {f}", run.spec_for(data_root, plan.fold_dir(f), resolved, budget=budget,
                                                   rows=plan.fold_rows(f))) for f in result.trained]
        outcomes = jobs.run_jobs(todo, cfg, after=int(refit), prep=prep, log=log, on_epoch=on_epoch)
        result.interrupted = any(o["status"] == "interrupted" for o in outcomes.values())
        result.failed = [f for f in chosen if not rundir.is_done(plan.fold_dir(f))]
        result.missing = [f for f in range(k) if not rundir.is_done(plan.fold_dir(f))]
        if not (result.interrupted or result.missing):
            summarize(result, collect_cv(prep, plan), data_root, resolved, budget=budget, refit=refit, submit=submit,
                      log=log, on_epoch=on_epoch)
    return result


def summarize(result: CvResult, summary: dict, data_root, resolved: config.Resolved, *, budget: planning.Budget,
              refit: bool, submit: str, log: jobs.Log, on_epoch) -> None:
    """The figures of cv.json into `result`; with refit, the refit run and which submission is DIR's."""
    out = result.out
    result.per_fold, result.fold_acc, result.oof_acc = summary["per_fold"], summary["fold_acc"], summary["oof_acc"]
    result.oof_loss, result.labelled_images = summary["oof_loss"], summary["labelled_images"]
    result.oof, result.summary = out / "oof.npz", out / "cv.json"
    result.submission = out / summary["submission"] if summary["submission"] else None
    if not refit:
        return
    result.refit = refit_all(data_root, out, resolved, result.per_fold, budget=budget, log=log, on_epoch=on_epoch)
    if submit == "refit" and result.refit["outcome"]["status"] == "done" and result.submission:
        tmpfiles.write_bytes(result.submission, (out / "refit" / "submission.csv").read_bytes())
        result.submission_from = "refit"
    summary.update(refit=result.refit, submission_from=result.submission_from)
    tmpfiles.write_text(out / "cv.json", json.dumps(summary, indent=2))


def refit_all(data_root: str | Path, out: Path, resolved: config.Resolved, per_fold: list[dict], *,
              budget: planning.Budget, log: jobs.Log, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """A final fit on every labelled image (holdout=none) for the folds' mean best epoch count, into
    out/refit/: each fold's best epoch is where its held-out score peaked, so their mean is the epoch
    budget that cross validation supports. Kept when an earlier call finished it."""
    epochs = max(1, round(float(np.mean([p["best_epoch"] for p in per_fold]))))
    cfg = config.with_values(config.with_epochs(resolved.cfg, epochs, resolved.given), holdout="none")
    run_dir = out / "refit"
    if rundir.is_done(run_dir):
        log(f"refit: already finished in {run_dir}: kept")
        outcome = rundir.read_outcome(run_dir)
    else:
        log(f"--- refit: {epochs} epoch(s) (the folds' mean best epoch) on all {sum(p['val_images'] for p in per_fold)} "
            f"labelled images: {run_dir}")
        job = jobs.Job("refit", run.spec_for(data_root, run_dir, config.Resolved(cfg, resolved.given), budget=budget))
        outcome = jobs.run_jobs([job], cfg, log=log, on_epoch=on_epoch)["refit"]
    return {"run": "refit", "epochs": epochs, "outcome": outcome}
