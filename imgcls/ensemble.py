"""Probabilities on disk matched by sample id, ensembles of runs, and the submission from them
(`imgcls predict`): each member is a run or a cv directory, scored with the same test-time views on
the test split and on the labelled images none of the members trained on."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgcls import config
from imgcls.errors import UserError
from imgcls.hardware import Hardware
from imgcls.inference import TTA_WEIGHT, load_run, tta_probs


def save_probs(path: Path, *, ids: list[str], classes: list[str], logits: torch.Tensor,
               labels: np.ndarray | None = None) -> None:
    """Logits and probabilities with their sample ids and class names: nothing is matched by position."""
    Probs(list(ids), list(classes), torch.softmax(logits, 1), logits, labels).save(path)


# --- probabilities on disk, matched by sample id ---------------------------------------------

@dataclass
class Probs:
    """Class probabilities for samples, with their ids and the class names: never matched by position."""
    ids: list[str]
    classes: list[str]
    probs: torch.Tensor  # float32 [N, C]
    logits: torch.Tensor | None = None
    labels: np.ndarray | None = None  # int64 [N] for labelled samples

    def take(self, ids: list[str]) -> "Probs":
        """The rows for `ids`, in that order; an id that is absent (or twice present) is an error."""
        index = {i: r for r, i in enumerate(self.ids)}
        if len(index) != len(self.ids):
            raise UserError(f"{len(self.ids) - len(index)} sample id(s) occur twice in a probability file.")
        missing = [i for i in ids if i not in index]
        if missing:
            raise UserError(f"{len(missing)} sample(s) have no prediction (e.g. {missing[:3]}): were these "
                            "probabilities made for another dataset or split?")
        rows = np.array([index[i] for i in ids], dtype=np.int64)
        return Probs(list(ids), self.classes, self.probs[rows],
                     None if self.logits is None else self.logits[rows],
                     None if self.labels is None else self.labels[rows])

    def save(self, path: Path, **extra: np.ndarray) -> None:
        arrays = dict(ids=np.array(self.ids), classes=np.array(self.classes), probs=self.probs.numpy(), **extra)
        if self.logits is not None:
            arrays["logits"] = self.logits.numpy()
        if self.labels is not None:
            arrays["labels"] = self.labels
        np.savez_compressed(path, **arrays)


def load_probs(path: str | Path) -> Probs:
    """A .npz written by save_probs or Probs.save (no pickles are read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No predictions at {path}: has that run finished?")
    with np.load(path, allow_pickle=False) as z:
        if "ids" not in z or "classes" not in z:
            raise UserError(f"{path} has no sample ids or class names, so its rows cannot be matched safely.")
        probs = z["probs"] if "probs" in z else torch.softmax(torch.from_numpy(z["logits"]), 1).numpy()
        return Probs([str(i) for i in z["ids"]], [str(c) for c in z["classes"]], torch.from_numpy(probs),
                     torch.from_numpy(z["logits"]) if "logits" in z else None,
                     z["labels"] if "labels" in z else None)


# --- ensembles ---------------------------------------------------------------------------------
# Each method: (probs [M, N, C], weights [M] summing to 1) -> (scores [N, C], predictions [N]).

def _mean_probs(probs: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = (w[:, None, None] * probs).sum(0)
    return scores, scores.argmax(1)


def _mean_logits(probs: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of log-probabilities: the same softmax as the mean of logits (log-softmax only shifts each
    row by a constant), so members saved as probabilities can be averaged as logits."""
    scores = torch.softmax((w[:, None, None] * probs.clamp_min(1e-12).log()).sum(0), 1)
    return scores, scores.argmax(1)


def _vote(probs: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted majority vote; among the classes tied for most votes, the one with the largest summed
    probability wins. Scores are vote shares."""
    votes = (w[:, None, None] * F.one_hot(probs.argmax(2), probs.shape[2]).float()).sum(0)
    summed = (w[:, None, None] * probs).sum(0)
    tied = votes >= votes.max(1, keepdim=True).values - 1e-6  # float weights: 0.1 + 0.2 ties with 0.3
    return votes, torch.where(tied, summed, torch.full_like(summed, -1.0)).argmax(1)


ENSEMBLES = {"mean": _mean_probs, "logits": _mean_logits, "vote": _vote}


def ensemble(probs: list[torch.Tensor], *, method: str = "mean",
             weights: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine members' probabilities (rows already matched by id) -> (scores [N, C], predictions [N])."""
    if method not in ENSEMBLES:
        raise UserError(f"--ensemble {method} is not one of {', '.join(ENSEMBLES)}.")
    weights = [1.0] * len(probs) if weights is None else list(weights)
    if len(weights) != len(probs) or min(weights) < 0 or sum(weights) <= 0:
        raise UserError(f"--weights needs one non-negative number per run ({len(probs)}), not all zero; "
                        f"got {','.join(map(str, weights))}.")
    w = torch.tensor(weights, dtype=torch.float32) / sum(weights)
    return ENSEMBLES[method](torch.stack([p.float() for p in probs]), w)


# --- members: a run directory, or a cv directory (its folds averaged) --------------------------

@dataclass
class Member:
    path: Path
    runs: list[Path]  # run directories whose models are averaged: one, or the folds of a cv directory
    heldout: Path | None  # predictions on images the member never trained on: oof.npz or val_logits.npz
    kind: str  # run | cv


def member(path: str | Path) -> Member:
    path = Path(path)
    if (path / "cv.json").is_file():
        cv = json.loads((path / "cv.json").read_text())
        return Member(path, [path / f["run"] for f in cv["per_fold"]], path / "oof.npz", "cv")
    if (path / "folds.json").is_file():
        raise UserError(f"The cross validation in {path} has not finished (no cv.json): rerun its `imgcls cv` "
                        "command, which trains only the folds still missing.")
    if (path / "seeds.json").is_file():
        seeds = json.loads((path / "seeds.json").read_text())
        raise UserError(f"{path} holds repeats over seeds; name the runs, e.g. "
                        + " ".join(str(path / r["run"]) for r in seeds["runs"]) + ".")
    heldout = path / "val_logits.npz"
    return Member(path, [path], heldout if heldout.is_file() else None, "run")


def member_probs(m: Member, prepared, *, split: str, hw: Hardware, tta: int = 0, tta_weight: float = TTA_WEIGHT,
                 tta_views: str = "fixed", batch_size: int = 512) -> Probs | None:
    """The member's probabilities on `split`: "test" (a cv member: the mean over its folds) or "heldout"
    (each run on the labelled images it did not train on, i.e. its val_logits.npz ids; a cv member's
    folds together give the out-of-fold set). None for "heldout" when the data lacks those images.

    prepared(cfg) -> Prepared for that run's data settings (image size and cache differ between runs)."""
    parts = []
    for run_dir in m.runs:
        run = load_run(run_dir, hw=hw)
        prep = prepared(run.cfg)
        if run.classes != prep.classes:
            raise UserError(f"{run.path} was trained on classes {run.classes[:5]}..., which differ from the "
                            f"data's {prep.classes[:5]}...")
        if split == "heldout":
            row_of = {i: r for r, i in enumerate(prep.ids)}
            ids = load_probs(run_dir / "val_logits.npz").ids
            if any(i not in row_of for i in ids):
                return None
            rows = np.array([row_of[i] for i in ids], dtype=np.int64)
        else:
            rows = prep.rows.get(split)
            if rows is None or len(rows) == 0:
                raise UserError(f"{prep.dataset.root} has no {split} split to predict.")
        probs = tta_probs(run.model, prep.images, rows, size=config.eval_size(run.cfg.data), hw=hw, n=tta,
                          weight=tta_weight, views=tta_views, aug=run.cfg.aug, seed=run.cfg.run.seed,
                          batch_size=batch_size, crop=run.cfg.data.eval_crop)
        parts.append(Probs([prep.ids[i] for i in rows], prep.classes, probs, labels=prep.labels[rows]))
    if split == "heldout":  # the folds' held-out sets are disjoint: together they are the OOF set
        return Probs([i for p in parts for i in p.ids], parts[0].classes, torch.cat([p.probs for p in parts]),
                     labels=np.concatenate([p.labels for p in parts]))
    ids = parts[0].ids
    probs, _ = ensemble([p.take(ids).probs for p in parts], method="mean")
    return Probs(ids, parts[0].classes, probs)


def heldout_accuracy(heldout: list[Probs], *, method: str = "mean", weights: list[float] | None = None) -> dict:
    """Accuracy of each member and of their ensemble on the labelled images that no member trained on
    (the ids common to all members' held-out predictions)."""
    common = set(heldout[0].ids).intersection(*(h.ids for h in heldout[1:]))
    ids = [i for i in heldout[0].ids if i in common]
    if not ids:
        return {"images": 0, "members": [], "ensemble": None}
    aligned = [h.take(ids) for h in heldout]
    labels = aligned[0].labels
    for h in aligned:
        if h.labels is None or not (h.labels == labels).all():
            raise UserError("Two runs label the same held-out images differently: were they trained on different data?")
    accs = [float((h.probs.argmax(1).numpy() == labels).mean()) for h in aligned]
    _, preds = ensemble([h.probs for h in aligned], method=method, weights=weights)
    return {"images": len(ids), "members": accs, "ensemble": float((preds.numpy() == labels).mean())}


# --- ensemble weights fitted on held-out predictions -------------------------------------------------

def fit_weights(heldout: list[Probs], *, method: str = "mean") -> tuple[list[float], dict]:
    """Non-negative weights summing to 1 that minimise the log loss of the ensemble on the labelled
    images every member holds out (out-of-fold predictions of cv members, validation predictions of
    runs). Weights are a softmax of free parameters, so L-BFGS needs no constraints; a vote is fitted
    as the mean of probabilities it breaks its ties with. Returns (weights, figures): images, log loss
    and accuracy with the fitted and with equal weights, on those same images (so the fitted ones are
    optimistic: they were chosen there)."""
    from scipy.optimize import minimize

    common = set(heldout[0].ids).intersection(*(h.ids for h in heldout[1:]))
    ids = [i for i in heldout[0].ids if i in common]
    if not ids:
        raise UserError("--weights oof needs labelled images that every run holds out (the same images out of "
                        "fold in each cv, or the same validation split), and these runs share none.")
    aligned = [h.take(ids) for h in heldout]
    labels = torch.as_tensor(aligned[0].labels)
    probs = torch.stack([a.probs.double() for a in aligned])
    pool = "logits" if method == "logits" else "mean"

    def loss(z: np.ndarray) -> float:
        w = torch.softmax(torch.as_tensor(z), 0)
        scores, _ = ENSEMBLES[pool](probs, w)
        return float(-scores[torch.arange(len(ids)), labels].clamp_min(1e-12).log().mean())

    z = minimize(loss, np.zeros(len(heldout)), method="L-BFGS-B").x
    weights = torch.softmax(torch.as_tensor(z), 0).tolist()
    figures = {"images": len(ids)}
    for name, w in (("fitted", weights), ("equal", [1 / len(heldout)] * len(heldout))):
        _, preds = ensemble([a.probs for a in aligned], method=method, weights=w)
        figures[name] = {"log_loss": loss(np.log(np.asarray(w) + 1e-12)),
                         "accuracy": float((preds == labels).float().mean())}
    return weights, figures


# --- the submission from runs (`imgcls predict`) -------------------------------------------------

@dataclass
class PredictResult:
    submission: Path
    probs: Path  # <submission>.probs.npz: the ensemble's test probabilities, with ids and class names
    rows: int
    views: str  # e.g. "plain view", "plain + 8 fixed TTA views (plain weight 0.5)"
    members: list[Member]  # path, kind (run | cv), runs (a cv member's folds)
    method: str
    weights: list[float] | None = None
    heldout: dict | None = None  # images, members (accuracy each), ensemble; None without held-out predictions
    fitted: dict | None = None  # --weights oof: images, and log loss + accuracy with fitted and equal weights


def parse_weights(weights: str | list[float] | None, n: int) -> list[float] | str | None:
    """--weights: one number per run, as "1,1,2" or a list; None = equal; "oof" = fitted on held-out predictions."""
    if weights is None or weights == "":
        return None
    if weights == "oof":
        return weights
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UserError(f"--weights takes comma-separated numbers, one per run, e.g. 1,1,2; got {weights!r}.") from None
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UserError(f"--weights has {len(weights)} number(s) but {n} run(s) were given.")
    return weights


def predict_runs(runs: list[str | Path], data_root: str | Path, out: str | Path, *, hw: Hardware, tta: int = 0,
                 tta_weight: float = TTA_WEIGHT, tta_views: str = "fixed", method: str = "mean",
                 weights: str | list[float] | None = None, progress: bool = True, prepare=None) -> PredictResult:
    """Every member's test probabilities (with TTA), combined, written as the submission; and each
    member's and the ensemble's accuracy on the labelled images none of them trained on.
    `prepare(cfg) -> Prepared`: the data for a run's settings (default data.prepare(data_root, cfg);
    `imgcls check` passes its few images)."""
    from imgcls import data, submission
    from imgcls.inference import check_tta

    check_tta(tta, tta_weight, tta_views)  # before any image is decoded
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: --out is the submission file to write, e.g. {out / 'submission.csv'}.")
    members = [member(r) for r in runs]
    weights = parse_weights(weights, len(members))
    preps = []  # (data settings, Prepared): runs trained at other image sizes need their own cache

    def prepared(cfg):
        for data_cfg, prep in preps:
            if data_cfg == cfg.data:
                return prep
        preps.append((cfg.data, prepare(cfg) if prepare else data.prepare(data_root, cfg, progress=progress)))
        return preps[-1][1]

    tta_kw = dict(tta=tta, tta_weight=tta_weight, tta_views=tta_views, hw=hw)
    heldout = None
    if all(m.heldout for m in members):
        # Held-out predictions with the same views as the submission: from disk when plain, else recomputed.
        heldout = ([load_probs(m.heldout) for m in members] if not tta else
                   [member_probs(m, prepared, split="heldout", **tta_kw) for m in members])
    fitted = None
    if weights == "oof":
        if not heldout or not all(heldout):
            raise UserError("--weights oof fits the weights on held-out predictions, but "
                            + ", ".join(str(m.path) for m in members if not m.heldout)
                            + " has none (a holdout=none run, or one whose data is not this folder).")
        weights, fitted = fit_weights(heldout, method=method)
    parts = [member_probs(m, prepared, split="test", **tta_kw) for m in members]
    ids = parts[0].ids
    probs, preds = ensemble([p.take(ids).probs for p in parts], method=method, weights=weights)
    prep = preps[0][1]
    path = submission.write(prep.dataset, dict(zip(ids, preds.tolist())), out)
    Probs(ids, prep.classes, probs).save(path.with_suffix(".probs.npz"))
    views = f"plain + {tta} {tta_views} TTA views (plain weight {tta_weight})" if tta else "plain view"
    result = PredictResult(path, path.with_suffix(".probs.npz"), len(ids), views, members, method, weights,
                           fitted=fitted)
    if heldout and all(heldout):
        result.heldout = heldout_accuracy(heldout, method=method, weights=weights)
    return result
