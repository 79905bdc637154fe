"""infer() returns logits; evaluation, test-time augmentation and ensembles build on it."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from imgcls import augment, checkpoint, config
from imgcls.errors import UserError
from imgcls.hardware import Hardware
from imgcls.models import create_model


def _batches(images, rows: np.ndarray, batch_size: int, device: torch.device):
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if isinstance(images, torch.Tensor):
            yield images.index_select(0, torch.as_tensor(chunk, device=images.device)).to(device, non_blocking=True)
        else:
            yield torch.from_numpy(np.ascontiguousarray(images[chunk])).to(device)


@torch.no_grad()
def infer(model: nn.Module, images, rows: np.ndarray, *, size: int, hw: Hardware, batch_size: int = 512,
          view=None) -> torch.Tensor:
    """Logits (float32, on the CPU) for cache rows, in the order of `rows`.

    view(images_u8) -> the model's input (normalized); default: the plain evaluation view (resize only)."""
    model.eval()
    view = view or (lambda x: augment.eval_views(x, size=size))
    out = []
    for batch in _batches(images, rows, batch_size, hw.device):
        x = view(batch).contiguous(memory_format=hw.memory_format)
        with hw.autocast():
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, images, rows: np.ndarray, labels: np.ndarray, *, size: int, hw: Hardware,
             batch_size: int = 512) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, logits) on labelled rows."""
    logits = infer(model, images, rows, size=size, hw=hw, batch_size=batch_size)
    y = torch.as_tensor(labels[rows])
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item(), logits


@dataclass
class LoadedRun:
    path: Path
    cfg: config.Config
    classes: list[str]
    model: nn.Module


def load_run(run_dir: str | Path, *, weights: str = "best", hw: Hardware) -> LoadedRun:
    """A trained run directory -> its config and model with `best` (or `last`) weights on hw.device."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir} is not an imgcls run directory (no config.yaml / manifest.json).")
    cfg = config.resolve(file=run_dir / "config.yaml")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    classes = manifest["classes"]
    model = create_model(cfg.model.model, len(classes), width=cfg.model.width, dropout=cfg.model.dropout)
    checkpoint.load_weights(model, run_dir / f"{weights}.safetensors")
    model.to(hw.device, memory_format=hw.memory_format).eval()
    return LoadedRun(run_dir, cfg, classes, model)


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


# --- test-time augmentation --------------------------------------------------------------------
# final probs = weight * p(plain eval view) + (1 - weight) * mean of p over n views.
# Two view sets: "fixed" (the default) is flips and shifted crops, the same on every run and
# device; "aug" draws views with the run's own training augmentation from a seeded generator.

TTA_WEIGHT = 0.5  # weight of the plain view; 1 = plain prediction
CROP = 0.875  # shifted crops keep 87.5% of the side: corner crops sit 6.25% of the side off centre,
#              like airbench's 2 px translation at 32 px
FIXED_VIEWS = [("full", True), ("top_left", False), ("bottom_right", True), ("top_right", False),
               ("bottom_left", True), ("center", False), ("top_left", True), ("bottom_right", False),
               ("top_right", True), ("bottom_left", False), ("center", True)]  # (crop, hflip), plain view excluded


def fixed_view(images_u8: torch.Tensor, *, size: int, crop: str, flip: bool) -> torch.Tensor:
    """Cache rows -> one deterministic view, normalized: a CROP-sized corner/centre crop (or the full
    image), optionally flipped, resized to `size`."""
    import torchvision.transforms.v2.functional as TF

    x = augment.to_float(images_u8)
    side = x.shape[-1]
    c = round(CROP * side)
    offsets = {"top_left": (0, 0), "top_right": (0, side - c), "bottom_left": (side - c, 0),
               "bottom_right": (side - c, side - c), "center": ((side - c) // 2, (side - c) // 2)}
    if crop != "full":
        top, left = offsets[crop]
        x = TF.crop(x, top, left, c, c)
    if flip:
        x = TF.horizontal_flip(x)
    return augment.normalize(augment.resize(x, size))


def fixed_views(n: int, *, size: int, aug, seed: int, device: torch.device) -> list:
    if n > len(FIXED_VIEWS):
        raise UserError(f"--tta {n} asks for more than the {len(FIXED_VIEWS)} fixed views (flip, and 5 crops each "
                        f"plain and flipped); use --tta {len(FIXED_VIEWS)} or fewer, or --tta-views aug.")
    return [partial(fixed_view, size=size, crop=crop, flip=flip) for crop, flip in FIXED_VIEWS[:n]]


def aug_views(n: int, *, size: int, aug, seed: int, device: torch.device) -> list:
    """n views from the run's training augmentation (batch mixing off: it would blend test images).
    One generator, seeded, serves all views in turn: the same seed and batch size give the same views."""
    from imgcls import hardware

    pipeline = augment.build_train_pipeline(replace(aug, mixup_alpha=0.0, cutmix_alpha=0.0), size=size)
    g = hardware.make_generator(device, seed)

    def view(images_u8: torch.Tensor) -> torch.Tensor:
        no_targets = torch.zeros(len(images_u8), 1, device=images_u8.device)
        return augment.train_views(images_u8, no_targets, g, pipeline)[0]
    return [view] * n


TTA_VIEWS = {"fixed": fixed_views, "aug": aug_views}


def tta_probs(model: nn.Module, images, rows: np.ndarray, *, size: int, hw: Hardware, n: int = 0,
              weight: float = TTA_WEIGHT, views: str = "fixed", aug=None, seed: int = 0,
              batch_size: int = 512) -> torch.Tensor:
    """Probabilities [len(rows), C]: weight * p(plain view) + (1 - weight) * mean over n views; n=0 is plain."""
    if not 0 <= weight <= 1:
        raise UserError(f"--tta-weight is the plain view's weight in [0, 1], got {weight}.")
    if views not in TTA_VIEWS:
        raise UserError(f"--tta-views {views} is not one of {', '.join(TTA_VIEWS)}.")
    probs = infer(model, images, rows, size=size, hw=hw, batch_size=batch_size).softmax(1)
    if n <= 0:
        return probs
    view_fns = TTA_VIEWS[views](n, size=size, aug=aug, seed=seed, device=hw.device)
    mean = sum(infer(model, images, rows, size=size, hw=hw, batch_size=batch_size, view=v).softmax(1)
               for v in view_fns) / n
    return weight * probs + (1 - weight) * mean


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
        probs = tta_probs(run.model, prep.images, rows, size=run.cfg.data.image_size, hw=hw, n=tta,
                          weight=tta_weight, views=tta_views, aug=run.cfg.aug, seed=run.cfg.run.seed,
                          batch_size=batch_size)
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
