"""Plots and the HTML report of a run directory or a cv directory.

`write(DIR)` reads what training left on disk (metrics.jsonl, val_logits.npz, config.yaml,
manifest.json; for `imgcls cv` also cv.json, oof.npz and the fold-k/ runs) and writes beside it:
curves.png, confusion.png, per_class.csv, per_class.png, mistakes.png, preview.png and
report.html, one file with every image inline as a data URI, so it can be mailed, attached or
pasted without its folder. Figures are drawn on matplotlib `Figure` objects (the Agg renderer,
no pyplot state), so nothing needs a display. Nothing here prints.

`TensorBoard` writes the same per-epoch scalars as TensorBoard events (`tensorboard=true`).
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from imgcls import config, ensemble, tmpfiles
from imgcls.errors import UserError

MISTAKES = 24  # most confident wrong predictions shown
MISTAKE_PX = 128  # side of a mistake thumbnail: bigger than most training sizes, so a person can judge the label
PREVIEW_IMAGES, PREVIEW_VIEWS = 6, 7  # augmentation preview: images x (eval view + training views)
DPI = 100
# Files this module writes; a later report removes the ones it could not make this time (no stale plots).
OUTPUTS = ("curves.png", "confusion.png", "per_class.csv", "per_class.png", "mistakes.png", "preview.png",
           "report.html")


@dataclass
class Source:
    """What a report is made from, read from a run or cv directory."""
    path: Path
    kind: str  # run | cv
    config_text: str
    manifest: dict
    runs: dict[str, list[dict]]  # curve label -> metrics.jsonl rows ("" for a single run)
    probs: ensemble.Probs | None = None  # with labels: validation (run) or out-of-fold (cv) predictions
    cv: dict | None = None  # cv.json
    notes: list[str] = field(default_factory=list)
    datasets: dict = field(default_factory=dict, repr=False)  # root -> layouts.read(root), read once per report
    words: dict | None = field(default=None, repr=False)  # wnid -> words.txt name, read once per report


@dataclass
class Report:
    path: Path  # report.html
    files: list[Path]  # every file written, report.html last
    confusion: np.ndarray | None  # int64 [C, C] counts: row = true class, column = predicted
    per_class: list[dict]  # class, images, correct, accuracy
    notes: list[str]  # what was left out, and why
    seconds: float


# --- reading a directory ------------------------------------------------------------------------

def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a kill can leave half a line; fit() drops it on resume too
            break
    return rows


def read_source(path: str | Path) -> Source:
    path = Path(path)
    if (path / "cv.json").is_file():
        cv = json.loads((path / "cv.json").read_text())
        fold_dirs = [path / p["run"] for p in cv["per_fold"]]
        manifest_file = fold_dirs[0] / "manifest.json"
        manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
        config_file = path / "config.yaml" if (path / "config.yaml").is_file() else fold_dirs[0] / "config.yaml"
        source = Source(path, "cv", config_file.read_text() if config_file.is_file() else "", manifest,
                        {f"fold {p['fold']}": read_metrics(d) for p, d in zip(cv["per_fold"], fold_dirs)}, cv=cv)
        probs_file = path / "oof.npz"
    elif (path / "config.yaml").is_file() and (path / "manifest.json").is_file():
        source = Source(path, "run", (path / "config.yaml").read_text(),
                        json.loads((path / "manifest.json").read_text()), {"": read_metrics(path)})
        probs_file = path / "val_logits.npz"
    else:
        hint = (" It looks like an unfinished cv directory: cv.json is written once every fold has finished."
                if any(path.glob("fold-*")) else
                " For `seeds=`, report one run: imgcls report DIR/seed-<s>." if (path / "seeds.json").is_file() else "")
        raise UserError(f"{path} is neither a run directory (config.yaml and manifest.json, from `imgcls train "
                        f"--out`) nor a cv directory (cv.json, from `imgcls cv --out`).{hint}")
    if probs_file.is_file():
        probs = ensemble.load_probs(probs_file)
        if probs.labels is not None and (probs.labels >= 0).all():
            source.probs = probs
        else:
            source.notes.append(f"{probs_file.name} holds no labels: no confusion matrix, per-class accuracy or mistakes.")
    elif source.manifest.get("holdout") == "none":
        source.notes.append("holdout=none: every labelled image was trained on, so there is no validation score, "
                            "confusion matrix, per-class accuracy or mistakes (the last weights are kept).")
    else:
        source.notes.append(f"No {probs_file.name}: the run has not finished (it is written from the best weights at "
                            "the end), so there is no confusion matrix, per-class accuracy or mistakes.")
    return source


def display_names(source: Source, classes: list[str]) -> list[str]:
    """Names for the axes: a Tiny ImageNet wnid becomes its first words.txt name ('goldfish')."""
    data = source.manifest.get("data", {})
    words = Path(data.get("root", "")) / "words.txt"
    if data.get("layout") != "tiny-imagenet" or not words.is_file():
        return list(classes)
    if source.words is None:  # a report asks three times: read the file once
        source.words = {}
        for line in words.read_text(errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            source.words[wnid.strip()] = text.split(",")[0].strip()
    return [source.words.get(c) or c for c in classes]


def _short(name: str, n: int = 22) -> str:
    return name if len(name) <= n else name[:n - 1] + "…"


# --- numbers -----------------------------------------------------------------------------------

def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted class; row sums = images per class."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return counts


def per_class_rows(counts: np.ndarray, classes: list[str]) -> list[dict]:
    images, correct = counts.sum(1), np.diag(counts)
    return [{"class": c, "images": int(n), "correct": int(k), "accuracy": float(k / n) if n else float("nan")}
            for c, n, k in zip(classes, images, correct)]


def confident_mistakes(probs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Row indices of the `n` wrong predictions with the highest predicted probability, highest first."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    order = np.argsort(-probs[wrong, preds[wrong]], kind="stable")
    return wrong[order[:n]]


def key_figures(source: Source, cfg: config.Config | None) -> list[tuple[str, str]]:
    rows = []
    if source.kind == "cv":
        cv = source.cv
        fa = cv["fold_acc"]
        rows += [("fold accuracy (mean ± sample std)", f"{fa['mean']:.4f} ± {fa['std']:.4f} over {fa['n']} folds"),
                 ("out-of-fold accuracy", f"{cv['oof_acc']:.4f} on {cv['labelled_images']} labelled images"),
                 ("out-of-fold loss", f"{cv['oof_loss']:.4f}")]
    else:
        metrics = source.runs[""]
        if source.probs is not None:
            acc = float((source.probs.probs.argmax(1).numpy() == source.probs.labels).mean())
            rows.append(("validation accuracy (best weights)", f"{acc:.4f} on {len(source.probs.ids)} images"))
        if source.manifest.get("holdout") == "none":
            rows.append(("validation", "none: holdout=none trained on train + validation; the last weights are kept"))
        elif metrics:
            best = max(metrics, key=lambda m: m.get("val_acc", -1))
            last = metrics[-1]
            rows.append(("best epoch", f"{best['epoch']} (val_acc {best.get('val_acc', float('nan')):.4f})"))
            rows.append(("last epoch", f"{last['epoch']}: val_acc {last.get('val_acc', float('nan')):.4f}, "
                         f"val_loss {last.get('val_loss', float('nan')):.4f}, train_acc "
                         f"{last.get('train_acc', float('nan')):.4f}, train_loss {last['train_loss']:.4f}"))
    every = [m for ms in source.runs.values() for m in ms]
    if every:
        seconds = sum(m.get("seconds", 0.0) for m in every)
        speed = float(np.median([m["images_per_second"] for m in every if "images_per_second" in m] or [float("nan")]))
        rows.append(("training time", f"{seconds:.0f} s over {len(every)} epoch(s), median {speed:.0f} train images/s"))
    if cfg:
        rows.append(("model", f"{cfg.model.model}{f' width={cfg.model.width}' if cfg.model.width else ''} at "
                     f"{cfg.data.image_size} px, {cfg.run.epochs} epochs planned, batch {cfg.run.batch_size}, "
                     f"seed {cfg.run.seed}"))
    m = source.manifest
    if m:
        data = m.get("data", {})
        rows.append(("data", f"{data.get('root', '?')} ({data.get('layout', '?')}, {len(m.get('classes', []))} "
                     f"classes, fingerprint {data.get('fingerprint', '?')})"))
        for alarm in alarms(m):
            rows.append(("subset" if alarm.startswith("SUBSET") else "pretrained", alarm))
        rows.append(("versions", f"imgcls {m.get('imgcls', '?')}, torch {m.get('torch', '?')}, python "
                     f"{m.get('python', '?')} on {m.get('device', '?')}"))
    return rows


def alarms(manifest: dict) -> list[str]:
    """What must not be missed about a run: a subset of the data, pretrained weights (issue 18)."""
    found = []
    subset = manifest.get("subset")
    if subset:
        kept = {k: sum(v) for k, v in subset.get("per_class", {}).items()}
        found.append(f"SUBSET RUN (subset={subset.get('setting')}): trained and validated on "
                     f"{', '.join(f'{n} {k}' for k, n in kept.items())} images of "
                     f"{sum(subset.get('images_before', {}).values())} labelled ones; not a run on the full data. "
                     "The test split was whole.")
    pretrained = manifest.get("pretrained")
    if pretrained:
        fresh = pretrained.get("reinitialised")
        found.append(f"PRETRAINED WEIGHTS: initialised from {pretrained.get('path')} (sha256 "
                     f"{str(pretrained.get('sha256', '?'))[:16]}...){'; classifier re-initialised: ' + ', '.join(fresh) if fresh else ''}. "
                     "food-11 (NTU ML2022 HW3) rules forbid pretrained weights; CSE 144 allows them.")
    return found


def _config(source: Source) -> config.Config | None:
    try:
        return config.resolve(defaults=yaml.safe_load(source.config_text) or {})
    except (UserError, yaml.YAMLError):  # e.g. a key of another imgcls version: the report shows the text anyway
        return None


# --- figures ----------------------------------------------------------------------------------

def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def plot_curves(runs: dict[str, list[dict]]) -> bytes:
    """Loss, accuracy (train dashed, validation solid) and learning rate per epoch; one colour per run."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    many = len(runs) > 1
    for k, (name, metrics) in enumerate(runs.items()):
        if not metrics:
            continue
        colour = f"C{k % 10}"
        epochs = [m["epoch"] for m in metrics]
        style = dict(color=colour, marker="o" if len(epochs) <= 30 else None, markersize=3)
        for ax, key in ((axes[0], "loss"), (axes[1], "acc")):
            for split, ls in (("train", "--"), ("val", "-")):
                ys = [m.get(f"{split}_{key}", math.nan) for m in metrics]
                label = f"{name} {split}" if many else split
                ax.plot(epochs, ys, ls, label=label if not many or split == "val" else None, **style)
        axes[2].plot(epochs, [m["lr"] for m in metrics], "-", label=name or None, **style)
        if "val_acc" in metrics[0] and not many:
            best = max(metrics, key=lambda m: m["val_acc"])
            axes[1].plot([best["epoch"]], [best["val_acc"]], "*", color="C3", markersize=12,
                         label=f"best {best['val_acc']:.4f} (epoch {best['epoch']})")
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate (at epoch end)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1)
    if many:
        axes[0].legend(handles=[Line2D([], [], color="k", ls="--", label="train"),
                                Line2D([], [], color="k", ls="-", label="val")], fontsize=8)
        axes[1].legend(fontsize=8, ncol=2)
    else:
        axes[0].legend(fontsize=8)
        axes[1].legend(fontsize=8)
    return png(fig)


def plot_confusion(counts: np.ndarray, names: list[str]) -> bytes:
    """Row-normalized (each true class sums to 1), names on both axes. The figure grows with the number
    of classes (about 0.22 in per class), so 100 classes stay readable at 7 pt; past 150 every k-th name."""
    from matplotlib.figure import Figure

    n = len(names)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(45.0, max(7.0, 0.22 * n + 3.0))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01, label="fraction of the true class")
    font = 9 if n <= 30 else 7
    every = max(1, math.ceil(n / 150))
    ticks = np.arange(0, n, every)
    labels = [_short(names[i]) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=font)
    ax.set_yticks(ticks, labels, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = np.trace(counts) / max(1, counts.sum())
    ax.set_title(f"confusion matrix, row-normalized ({counts.sum()} images, accuracy {acc:.4f})")
    if n <= 20:  # the numbers fit in the cells
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, f"{rows[i, j]:.2f}"[1:] if rows[i, j] < 0.995 else "1", ha="center",
                            va="center", fontsize=8, color="white" if rows[i, j] > 0.5 else "black")
    return png(fig)


def plot_per_class(per_class: list[dict], names: list[str]) -> bytes:
    """Horizontal bars, worst class on top, with correct/images beside each; the dashed line is overall."""
    from matplotlib.figure import Figure

    order = sorted(range(len(per_class)), key=lambda i: (np.nan_to_num(per_class[i]["accuracy"], nan=-1), i))
    n = len(order)
    fig = Figure(figsize=(9, max(3.0, 0.22 * n + 1.3)), layout="constrained")
    ax = fig.subplots()
    accs = [np.nan_to_num(per_class[i]["accuracy"]) for i in order]
    y = np.arange(n)[::-1]  # first in `order` (the worst) at the top
    ax.barh(y, accs, color=[_bar_colour(a) for a in accs], height=0.75)
    ax.set_yticks(y, [_short(names[i]) for i in order], fontsize=9 if n <= 30 else 7)
    ax.set_ylim(-0.6, n - 0.4)
    for yy, i in zip(y, order):
        r = per_class[i]
        ax.text(min(1.0, np.nan_to_num(r["accuracy"])) + 0.01, yy, f"{r['correct']}/{r['images']}", va="center",
                fontsize=7 if n > 30 else 8)
    total = sum(r["images"] for r in per_class)
    overall = sum(r["correct"] for r in per_class) / max(1, total)
    ax.axvline(overall, color="k", ls="--", lw=1)  # a legend box would cover the bars' labels
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("accuracy")
    ax.set_title(f"per-class accuracy, worst on top (dashed line: overall {overall:.4f})")
    return png(fig)


def _bar_colour(acc: float) -> str:
    return "#d62728" if acc < 0.5 else "#ff7f0e" if acc < 0.75 else "#2ca02c"


def plot_mistakes(images: list[np.ndarray | None], titles: list[str], *, cols: int = 6, px: int = MISTAKE_PX) -> bytes:
    """A grid of `px` images with a 3-line title above each, drawn as one image on one axes at 1:1 pixels
    (24 subplots took 0.7 s to lay out and draw; this 0.3 s)."""
    from matplotlib.figure import Figure

    cell_w, band = px + 76, 56  # px: room for ~32 characters of 8 pt title, and its 3 lines
    cell_h = band + px + 14
    rows = math.ceil(len(images) / cols)
    canvas = np.full((rows * cell_h, cols * cell_w, 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(canvas.shape[1] / DPI, canvas.shape[0] / DPI))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for k, (image, title) in enumerate(zip(images, titles)):
        r, c = divmod(k, cols)
        y, x = r * cell_h + band, c * cell_w + (cell_w - px) // 2
        if image is None:
            canvas[y:y + px, x:x + px] = 230
            ax.text(x + px / 2, y + px / 2, "image not found", ha="center", va="center", fontsize=8)
        else:
            canvas[y:y + px, x:x + px] = image[:px, :px]
        ax.text(c * cell_w + cell_w / 2, r * cell_h + 4, title, ha="center", va="top", fontsize=8, linespacing=1.3)
    ax.imshow(canvas, interpolation="nearest")
    return png(fig)


# --- images from the dataset folder -------------------------------------------------------------

def read_dataset(root: Path, memo: dict | None = None):
    """layouts.read(root), kept in `memo` (Source.datasets) so one report lists the folder once."""
    from imgcls import layouts

    if memo is None:
        return layouts.read(root)
    if root not in memo:
        memo[root] = layouts.read(root)
    return memo[root]


def images_by_id(manifest: dict, ids: list[str], *, size: int, resize: str,
                 memo: dict | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Decode the files with these sample ids from the run's dataset folder (manifest data.root), as the
    cache does (same resize) but at `size` px. Returns (id -> image, a note on what could not be read)."""
    from imgcls import cache

    root = Path(manifest.get("data", {}).get("root", ""))
    if not str(root) or not root.is_dir():
        return {}, f"the dataset folder {root} is not there, so its images cannot be shown"
    try:
        ds = read_dataset(root, memo)
    except UserError as e:
        return {}, f"the dataset folder {root} cannot be read ({e})"
    paths = {s.id: s.path for split in ds.splits.values() for s in split}
    found = {}
    for i in ids:
        try:
            found[i] = cache.decode(paths[i], size, resize)
        except (KeyError, OSError, cache.DecodeError):
            pass
    missing = len(ids) - len(found)
    return found, f"{missing} of {len(ids)} images were not found in {root} (has the folder changed?)" if missing else ""


def preview_grid(manifest: dict, cfg: config.Config, *, images: int = PREVIEW_IMAGES, views: int = PREVIEW_VIEWS,
                   memo: dict | None = None) -> tuple[np.ndarray | None, list[str], str]:
    """imgcls.preview's grid (eval view, then training views drawn by the training code) for the first
    training image of `images` classes, decoded from the dataset folder: only those files, not the cache.
    Returns (grid, the class of each row, a note when there is no grid)."""
    from imgcls import cache, data, previewing

    root = Path(manifest.get("data", {}).get("root", ""))
    if not str(root) or not root.is_dir():
        return None, [], f"the dataset folder {root} is not there"
    ds = read_dataset(root, memo)
    size = config.cache_size(cfg.data)
    picked, arrays, seen = [], [], set()
    for s in ds.splits.get("train", []):
        if s.label in seen:
            continue
        try:
            arrays.append(cache.decode(s.path, size, cfg.data.resize))
        except (OSError, cache.DecodeError):
            continue
        picked.append(s)
        seen.add(s.label)
        if len(picked) == images:
            break
    if not picked:
        return None, [], f"no readable training image in {root}"
    mini = data.Prepared(dataclasses.replace(ds, splits={"train": picked}), np.stack(arrays),
                         np.array([s.label for s in picked], dtype=np.int64), [s.id for s in picked],
                         {"train": np.arange(len(picked))})
    # On the CPU: a few images need no GPU, and starting CUDA would cost seconds.
    cpu = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device="cpu"))
    shown = previewing.render(mini, cpu, views=views, images=len(picked))
    return previewing.grid(shown.views), [ds.classes[s.label] for s in picked], ""


# --- the report -------------------------------------------------------------------------------

def write(path: str | Path, *, mistakes: int = MISTAKES) -> Report:
    """All plots, per_class.csv and report.html into the run or cv directory `path`."""
    t0 = time.perf_counter()
    source = read_source(path)
    if not os.access(source.path, os.W_OK):
        raise UserError(f"{source.path} is not writable, and the report is written into it: copy the directory "
                        "somewhere writable and report the copy.")
    cfg = _config(source)
    out, pngs, files = source.path, {}, []
    counts, per_class, section_notes = None, [], {"mistakes": "", "preview": ""}
    if any(source.runs.values()):
        pngs["curves.png"] = plot_curves(source.runs)
    else:
        source.notes.append("No epoch has finished (metrics.jsonl is empty): no training curves.")
    if source.probs is not None:
        counts, per_class, csv_text = held_out_plots(source, pngs)
        tmpfiles.write_text(out / "per_class.csv", csv_text)
        files.append(out / "per_class.csv")
        section_notes["mistakes"] = mistakes_plot(source, cfg, pngs, n=mistakes)
    preview_rows, section_notes["preview"] = preview_plot(source, cfg, pngs)

    for name, data in pngs.items():
        tmpfiles.write_bytes(out / name, data)
        files.append(out / name)
    for name in OUTPUTS:  # a plot this report could not make must not be mistaken for a current one
        if name != "report.html" and out / name not in files:
            (out / name).unlink(missing_ok=True)
    page = render_html(source, cfg, pngs, per_class, section_notes=section_notes, preview_rows=preview_rows)
    tmpfiles.write_text(out / "report.html", page)
    files.append(out / "report.html")
    notes = source.notes + [f"{k}: {v}" for k, v in section_notes.items() if v]
    return Report(out / "report.html", files, counts, per_class, notes, time.perf_counter() - t0)


def held_out_plots(source: Source, pngs: dict[str, bytes]) -> tuple[np.ndarray, list[dict], str]:
    """Confusion matrix and per-class accuracy of the held-out predictions: (counts, rows, per_class.csv)."""
    probs = source.probs
    names = display_names(source, probs.classes)
    counts = confusion_matrix(probs.labels, probs.probs.argmax(1).numpy(), len(probs.classes))
    per_class = per_class_rows(counts, probs.classes)
    pngs["confusion.png"] = plot_confusion(counts, names)
    pngs["per_class.png"] = plot_per_class(per_class, names)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["class", "images", "correct", "accuracy"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "accuracy": "" if math.isnan(r["accuracy"]) else f"{r['accuracy']:.4f}"} for r in per_class)
    return counts, per_class, buf.getvalue()


def mistakes_plot(source: Source, cfg: config.Config | None, pngs: dict[str, bytes], *, n: int) -> str:
    """mistakes.png from the dataset's files; returns a note on what could not be shown."""
    probs = source.probs
    p, labels = probs.probs.numpy(), np.asarray(probs.labels, dtype=np.int64)
    rows = confident_mistakes(p, labels, n)
    if len(rows) == 0:
        return "no held-out image is predicted wrong."
    ids = [probs.ids[r] for r in rows]
    found, why = images_by_id(source.manifest, ids, size=MISTAKE_PX, resize=cfg.data.resize if cfg else "squash",
                              memo=source.datasets)
    if found:
        names, preds = display_names(source, probs.classes), p.argmax(1)
        # At most ~32 characters a line, the width of a cell: the file name, not the id's folders.
        titles = [f"{_short(probs.ids[r].rsplit('/', 1)[-1], 28)}\ntrue: {_short(names[labels[r]], 19)} "
                  f"({p[r, labels[r]]:.2f})\npred: {_short(names[preds[r]], 19)} ({p[r, preds[r]]:.2f})" for r in rows]
        pngs["mistakes.png"] = plot_mistakes([found.get(i) for i in ids], titles)
    return why


def preview_plot(source: Source, cfg: config.Config | None, pngs: dict[str, bytes]) -> tuple[list[str], str]:
    """preview.png; returns (the display name of each row's class, a note when there is no preview)."""
    from PIL import Image

    if not (source.manifest and cfg):
        return [], "the run has no readable config.yaml or manifest.json"
    try:
        grid, rows, note = preview_grid(source.manifest, cfg, memo=source.datasets)
    except UserError as e:
        return [], str(e)
    if grid is not None:
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        pngs["preview.png"] = buf.getvalue()
    return display_names(source, rows), note


def img(data: bytes, alt: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="{uri}">'


def table(header: list[str], rows: list[list[str]], *, foot: list[str] | None = None) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    tail = "<tfoot><tr>" + "".join(f"<td>{e(str(c))}</td>" for c in foot) + "</tr></tfoot>" if foot else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>{tail}</table>"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:24px auto;max-width:1240px;padding:0 16px}
h1{font-size:22px;margin-bottom:2px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
.sub{color:#666;margin-top:0} img{max-width:100%;height:auto;display:block;margin:6px 0}
.scroll{overflow:auto} .zoom:checked~.scroll{max-height:1400px;border:1px solid #eee} .zoom:checked~.scroll img{max-width:none}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 9px;text-align:left;vertical-align:top}
th{background:#f4f4f4} tfoot td{font-weight:600;background:#fafafa} .figures td:first-child{color:#555;white-space:nowrap}
pre{background:#f7f7f7;border:1px solid #e4e4e4;padding:8px;font-size:12px;white-space:pre-wrap;overflow-wrap:anywhere}
pre.cols{column-count:3;column-gap:28px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:8px 0}
.alarm{background:#fdecea;border-left:6px solid #c62828;padding:8px 12px;margin:8px 0;font-weight:600}
"""


def spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of folds' or seeds' figures."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def folds_section(cv: dict) -> list[str]:
    """The cv report's table of folds, with mean +- std."""
    fa = cv["fold_acc"]
    final = spread([p["final_val_acc"] for p in cv["per_fold"]])
    rows = [[p["fold"], p["run"], p["val_images"], f"{p['acc']:.4f}", p["best_epoch"],
             f"{p['final_val_acc']:.4f}", f"{p['seconds']:.0f}"] for p in cv["per_fold"]]
    foot = ["mean ± std", "", sum(p["val_images"] for p in cv["per_fold"]), f"{fa['mean']:.4f} ± {fa['std']:.4f}",
            "", f"{final['mean']:.4f} ± {final['std']:.4f}", ""]
    return [f"<h2>Folds ({cv['folds']}, seed {cv['seed']})</h2>",
            table(["fold", "run", "held-out images", "accuracy (best weights)", "best epoch", "last-epoch val_acc",
                    "seconds"], rows, foot=foot),
            f"<p>Out-of-fold accuracy {cv['oof_acc']:.4f} on {cv['labelled_images']} images. Std is the sample "
            "standard deviation over folds. Each fold's best epoch is chosen on its own held-out part, so these "
            "figures are slightly optimistic.</p>"]


def preview_section(pngs: dict[str, bytes], preview_rows: list[str], note: str | None) -> list[str]:
    e = html.escape
    if "preview.png" not in pngs:
        return ["<h2>Augmentation preview</h2>",
                f'<p class="note">Not available: {e(note or "no configuration or manifest")}.</p>']
    return ["<h2>Augmentation preview</h2>",
            f"<p>One training image of each of the first {len(preview_rows)} classes (rows: "
            f"{e(', '.join(preview_rows))}): first column the evaluation view, then {PREVIEW_VIEWS} views drawn "
            "by the run's training augmentation, through the training code (`imgcls preview` makes more).</p>",
            img(pngs["preview.png"], "augmentation preview")]


def render_html(source: Source, cfg: config.Config | None, pngs: dict[str, bytes], per_class: list[dict], *,
                section_notes: dict[str, str], preview_rows: list[str]) -> str:
    e = html.escape
    what = "cross validation" if source.kind == "cv" else "run"
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>imgcls report: {e(source.path.name)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>imgcls report: {e(source.path.name)}</h1>",
             f"<p class=sub>{what} in {e(str(source.path.resolve()))}, written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    parts += [f'<p class="alarm">{e(a)}</p>' for a in alarms(source.manifest)]  # above every figure
    parts.append('<table class="figures">' + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>"
                                                     for k, v in key_figures(source, cfg)) + "</table>")
    parts += [f'<p class="note">{e(n)}</p>' for n in source.notes]
    mistake_note, preview_note = section_notes["mistakes"], section_notes["preview"]
    if source.kind == "cv":
        parts += folds_section(source.cv)
    if "curves.png" in pngs:
        parts += ["<h2>Training curves</h2>", img(pngs["curves.png"], "training curves")]
    held = "out-of-fold" if source.kind == "cv" else "validation"
    if "confusion.png" in pngs:
        confusion = img(pngs["confusion.png"], "confusion matrix")
        parts.append(f"<h2>Confusion matrix ({held} predictions of the best weights)</h2>")
        if len(per_class) > 40:  # fitted to the page the names are too small: a CSS-only switch to full size
            parts.append('<div><input type="checkbox" id="zoom-confusion" class="zoom"> <label for="zoom-confusion">'
                         f'full size (the class names readable; scroll)</label><div class="scroll">{confusion}</div></div>')
        else:
            parts.append(confusion)
    if "per_class.png" in pngs:
        worst = sorted(per_class, key=lambda r: (np.nan_to_num(r["accuracy"], nan=-1), r["class"]))
        rows = [[r["class"], r["images"], r["correct"], "" if math.isnan(r["accuracy"]) else f"{r['accuracy']:.4f}"]
                for r in worst]
        parts += ["<h2>Per-class accuracy</h2>", img(pngs["per_class.png"], "per-class accuracy"),
                  f"<details><summary>table ({len(rows)} classes, worst first; also per_class.csv)</summary>"
                  + table(["class", "images", "correct", "accuracy"], rows) + "</details>"]
    if source.probs is not None:
        parts.append(f"<h2>Most confident mistakes ({held})</h2>")
        if "mistakes.png" in pngs:
            parts.append(f"<p>The wrong predictions with the highest predicted probability: file name, true class "
                         f"(its probability), predicted class (its probability). Shown at {MISTAKE_PX} px.</p>")
            parts.append(img(pngs["mistakes.png"], "most confident mistakes"))
        if mistake_note:
            parts.append(f'<p class="note">{e(mistake_note)}</p>')
    parts += preview_section(pngs, preview_rows, preview_note)
    config_name = "config.yaml" + (" (shared by the folds)" if source.kind == "cv" else "")
    parts += [f"<h2>Configuration ({e(config_name)})</h2>", f'<pre class="cols">{e(source.config_text)}</pre>']
    manifest_name = "manifest.json" + (f" of {source.cv['per_fold'][0]['run']}" if source.kind == "cv" else "")
    parts += [f"<h2>Manifest ({e(manifest_name)})</h2>", f"<pre>{e(compact_json(source.manifest))}</pre>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def compact_json(value, indent: str = "") -> str:
    """JSON with objects indented and lists of plain values on one line (100 class names: one wrapped line)."""
    if isinstance(value, dict) and value:
        inner = indent + "  "
        items = [f"{inner}{json.dumps(k)}: {compact_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        inner = indent + "  "
        return "[\n" + ",\n".join(inner + compact_json(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False)
