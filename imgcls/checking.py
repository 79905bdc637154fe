"""`imgcls check DATA`: a real run's every stage with the user's exact settings, in seconds, before the
12-hour run (issue 18: the food-11 handout's "any error ... would result in early stopping" of a
background run; CSE 144's "see if your model can fit into the GPU memory").

It calls the code the real run calls, on the real data: the layout checks and the cache
(data.prepare: the real run reuses the cache it builds), then run.run on a few images - the real
model, augmentation, optimizer and batch size - for one epoch of `steps` steps, which scores,
checkpoints and writes its submission; run again for a second epoch, which resumes from that
state.pt; ensemble.predict_runs with the TTA the user will pass to predict; reporting.write. Any
UserError those raise is the message the real run would stop with. From the second (warm) epoch it
estimates what the real run costs on this machine; on a GPU the peak memory is torch's own count.

Everything goes into a temporary folder, deleted at the end, unless `out` keeps it. The one file
outside it is the decoded cache, in the cache folder the real run reads (cache_dir=), so that run
does not decode again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from imgcls import (config, data as datalib, distributed, ensemble, finetune, hardware, inference, layouts, optim,
                    planning, reporting, run, rundir, tmpfiles)
from imgcls.config import Config
from imgcls.data import Prepared
from imgcls.errors import UserError
from imgcls.models import create_model
from imgcls.optim import Schedule

CHECK_PREFIX = "imgcls-check-"  # the temporary folder of a check without --out
CPU_VAL_IMAGES = 16  # validation images scored on a CPU: enough to time evaluation, few enough for seconds
TEST_IMAGES = 8  # test images predicted with the TTA views and written as the check's submission


@dataclass
class Stage:
    name: str
    seconds: float
    detail: str


@dataclass
class Estimate:
    """What the real run would cost on this machine, from the check's warm training epoch."""
    device: str  # e.g. "cpu (x86_64), bf16 autocast"
    batch_size: int
    image_size: int
    images_per_second: float  # training, at batch_size and image_size
    eval_images_per_second: float
    steps_per_epoch: int
    epoch_seconds: float  # the steps and the validation of one epoch at full size, as metrics.jsonl's `seconds`
    epochs: int | None  # None: epochs=auto (planned by the run itself)
    run_seconds: float | None  # every epoch and the final predictions (the cache is decoded already), x seeds
    peak_memory: int  # bytes at the real batch size
    memory_source: str  # how peak_memory was measured
    cache_bytes: int  # the decoded images the real run holds in RAM or on the GPU
    notes: list[str] = field(default_factory=list)


@dataclass
class CheckResult:
    data: Path
    out: Path | None  # the kept folder (run/, submission.csv); None: it was a temporary folder
    stages: list[Stage]
    estimate: Estimate
    config: Config = field(repr=False)
    submission_rows: int  # rows of the check's submission (its few test images)
    test_images: int  # rows of the real run's submission
    seconds: float


class Stages:
    """Times each stage and logs it when it passes; an error inside passes through unchanged, so the user
    sees the message the real run would stop with."""

    def __init__(self, log: Callable[[str], None]):
        self.done: list[Stage] = []
        self.log = log

    @contextlib.contextmanager
    def stage(self, name: str):
        t0, detail = time.perf_counter(), []
        yield detail
        self.done.append(Stage(name, time.perf_counter() - t0, "; ".join(detail)))
        self.log(f"check: {name} ok ({self.done[-1].seconds:.1f}s){': ' + self.done[-1].detail if detail else ''}")


# --- before anything is decoded ----------------------------------------------------------------

def out_folder(out: str | Path | None, stack: contextlib.ExitStack) -> tuple[Path, Path | None]:
    """(folder to write into, the kept folder or None): `out` when given (new or empty, and writable),
    else a temporary folder removed when `stack` closes."""
    if out is None:
        tmpfiles.remove_stale_dirs(CHECK_PREFIX)  # what a killed check left (~200 MB for a real dataset)
        return Path(stack.enter_context(tmpfiles.temp_dir(CHECK_PREFIX))), None
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} is not an empty folder: the check writes a run, a submission and a report "
                        "there. Give a new or empty folder, or leave --out off to check in a temporary folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"--out {out} is not writable ({e.strerror or e}): choose a folder you can write to, or "
                        "leave --out off to check in a temporary folder.") from None
    stack.enter_context(rundir.claim(out, "check"))  # one process at a time
    return out, out


def check_model(data: str | Path, cfg: Config) -> str:
    """Build the model (a name typo is refused here, in seconds, not after decoding) and load init=."""
    ds = layouts.read(data)
    model = create_model(cfg.model.model, max(1, ds.num_classes), width=cfg.model.width, dropout=cfg.model.dropout)
    detail = f"{cfg.model.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    if cfg.model.init:
        detail += "; " + finetune.init_line(finetune.load_init(model, cfg.model.init), ds.num_classes)
    norm = finetune.mean_std(model, cfg)
    return detail + (f"; input mean/std {norm['mean']}/{norm['std']} ({norm['source']})" if norm else "")


# --- a few images of the real data -------------------------------------------------------------

def pick(rows: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n of `rows`, the classes taken in turn (the k-th image of every class before any class's k+1-th)."""
    if n >= len(rows):
        return rows
    perm = np.random.default_rng(seed).permutation(rows)
    lab, rank = labels[perm], np.zeros(len(perm), dtype=np.int64)
    for c in np.unique(lab):
        rank[lab == c] = np.arange(int((lab == c).sum()))
    return np.sort(perm[np.argsort(rank, kind="stable")[:n]])


def miniature(prep: Prepared, *, train: int, val: int, test: int, seed: int) -> Prepared:
    """A Prepared of a few of prep's rows (their images copied out of the cache), whose dataset lists only
    those test images, in the template's order: what fit(), finish() and the submission writer get."""
    take = {"train": pick(prep.rows["train"], prep.labels, train, seed),
            "val": pick(prep.rows["val"], prep.labels, val, seed),
            "test": np.sort(np.random.default_rng(seed).permutation(prep.rows.get("test", np.empty(0, np.int64)))[:test])}
    order = np.concatenate(list(take.values())).astype(np.int64)
    starts = np.cumsum([0] + [len(v) for v in take.values()])
    rows = {k: np.arange(starts[i], starts[i + 1]) for i, k in enumerate(take)}
    ds = prep.dataset
    kept = {prep.ids[i] for i in take["test"]}
    mini = dataclasses.replace(ds, splits={**ds.splits, "test": [s for s in ds.splits.get("test", []) if s.id in kept]},
                               template=None if ds.template is None else [i for i in ds.template if i in kept])
    return dataclasses.replace(prep, dataset=mini, images=np.ascontiguousarray(prep.images[order]),
                               labels=prep.labels[order], ids=[prep.ids[i] for i in order], rows=rows)


def plans(cfg: Config) -> tuple[Config, Config]:
    """The settings of the check's two fits: the user's, but 2 epochs (the first alone, then resumed),
    no time limit or seeds=, with what changes over a real run's epochs crowded into them: epoch 1 frozen
    (freeze_epochs=) and at the first progressive size, epoch 2 at full size, unfrozen and, with
    mix_off_epochs=, unmixed. The second continues the first on purpose (resume=)."""
    base = config.with_values(cfg, time_limit="", resume="", seeds=(), freeze_epochs=min(cfg.optim.freeze_epochs, 1))
    first = config.with_values(base, epochs=1, mix_off_epochs=0)
    second = config.with_values(base, epochs=2, mix_off_epochs=min(cfg.aug.mix_off_epochs, 1), prog_end=0.5)
    return first, second


# --- memory -------------------------------------------------------------------------------------

def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), None)
    except OSError:
        return None


@contextlib.contextmanager
def peak_memory(hw: hardware.Hardware):
    """Yields a dict that gets `bytes` and `source` at exit: the peak memory of what ran inside. CUDA:
    torch.cuda.max_memory_allocated. CPU (Linux): the peak resident memory (VmHWM, reset through
    /proc/self/clear_refs) above the resident memory before; elsewhere the growth of ru_maxrss."""
    found: dict = {}
    if hw.device.type == "cuda":
        torch.cuda.synchronize(hw.device)
        torch.cuda.reset_peak_memory_stats(hw.device)
        before = torch.cuda.memory_allocated(hw.device)
        yield found
        found.update(bytes=torch.cuda.max_memory_allocated(hw.device) - before,
                     source="torch.cuda.max_memory_allocated, above what was allocated before the step")
        return
    reset = False
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        reset = True
    import resource

    rss = _status_kib("VmRSS") if reset else None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    yield found
    if rss is not None and _status_kib("VmHWM") is not None:
        grown, how = (_status_kib("VmHWM") - rss) * 1024, "peak resident memory (VmHWM) above the resident memory before"
    else:
        grown, how = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss) * 1024, "growth of the peak resident memory (ru_maxrss); 0 when an earlier peak was higher"
    found.update(bytes=max(0, grown), source=f"CPU estimate: the process's {how}")


# --- the check ----------------------------------------------------------------------------------

def time_eval(run_dir: Path, mini: Prepared, hw: hardware.Hardware) -> tuple[float, int]:
    """(seconds, images): the check's validation images (its test images when nothing is held out)
    scored by the run loaded as predict loads it. Timed on its own: on a GPU the epoch's own
    eval_seconds also waits for the training steps still queued."""
    run = inference.load_run(run_dir, hw=hw)
    size, bs = config.eval_size(run.cfg.data), run.cfg.run.eval_batch_size
    rows = mini.rows["val"] if len(mini.rows["val"]) else mini.rows.get("test", mini.rows["val"])
    if hw.device.type == "cuda":
        torch.cuda.synchronize(hw.device)
    t0 = time.perf_counter()
    inference.infer(run.model, mini.images, rows, size=size, hw=hw, batch_size=bs, crop=run.cfg.data.eval_crop)  # ends in .cpu(): synced
    return time.perf_counter() - t0, len(rows)


def run_check(data: str | Path, resolved: config.Resolved, *, out: str | Path | None = None, tta: int = 0,
              tta_weight: float = inference.TTA_WEIGHT, tta_views: str = "fixed", steps: int = 1,
              log: Callable[[str], None] = lambda text: None,
              on_epoch: Callable[[dict], None] | None = None) -> CheckResult:
    """Every stage of `imgcls train` + `imgcls predict --tta` with these settings, on a few of data's images."""
    t0, cfg = time.perf_counter(), resolved.cfg
    if distributed.from_env()[1] > 1:
        raise UserError("imgcls check runs in one process: start it without torchrun.")
    if steps < 1:
        raise UserError(f"--steps is the training steps per check epoch, at least 1; got {steps}.")
    stages = Stages(log)
    with contextlib.ExitStack() as stack:
        with stages.stage("settings") as detail:
            inference.check_tta(tta, tta_weight, tta_views)
            folder, kept = out_folder(out, stack)
            if cfg.run.resume:
                detail.append(f"resume={cfg.run.resume} holds {rundir.resume_source(cfg, folder / 'run') / 'state.pt'}")
            hw = hardware.resolve(cfg.run)
            detail.append(hardware.describe(hw))
        with stages.stage("model") as detail:
            detail.append(check_model(data, cfg))
        with stages.stage("data") as detail:
            prep = datalib.prepare(data, cfg, progress=cfg.run.progress)
            detail.append(f"{prep.dataset.describe()}; cache {prep.cache_path} "
                          f"{'built (the real run reuses it)' if prep.cache_built else 'reused'}")
            if prep.skipped:
                detail.append(f"{len(prep.skipped)} unreadable training image(s) would be skipped (imgcls inspect lists them)")
            if prep.before_subset:
                detail.append(datalib.subset_line(prep, cfg))
        n_val = len(prep.rows["val"]) if hw.device.type == "cuda" else CPU_VAL_IMAGES  # a GPU: a full eval batch
        mini = miniature(prep, train=cfg.run.batch_size * steps, val=min(n_val, cfg.run.eval_batch_size),
                         test=TEST_IMAGES, seed=cfg.run.seed)
        first, second = plans(cfg)
        run_dir = folder / "run"
        fit = lambda c: run.run(run.spec_for(data, run_dir, config.Resolved(c, resolved.given), report=False),  # noqa: E731
                                prep=mini, log=log, on_epoch=on_epoch)
        with stages.stage("train") as detail, peak_memory(hw) as memory:
            fit(first)
            detail.append(f"{steps} step(s) of {cfg.run.batch_size} images, evaluation, checkpoint, submission")
        with stages.stage("resume") as detail:
            resumed = fit(config.with_values(second, resume=str(run_dir)))
            detail.append(f"from {run_dir / 'state.pt'}: epoch {resumed.epochs_done} of 2")
        with stages.stage("predict") as detail:
            eval_seconds, eval_images = time_eval(run_dir, mini, hw)  # the run loaded as predict loads it
            written = 0
            if len(mini.rows["test"]):
                predicted = ensemble.predict_runs([run_dir], data, folder / "submission.csv", hw=hw, tta=tta,
                                                  tta_weight=tta_weight, tta_views=tta_views, progress=False,
                                                  prepare=lambda run_cfg: mini)
                written = predicted.rows
                detail.append(f"{predicted.views}; {written} rows written and validated")
            else:  # a labelled-only folder (imgcls tune's view, a held-out study): nothing to submit
                detail.append("no test split: the weights were loaded as predict loads them; no submission")
        with stages.stage("report") as detail:
            detail.append(str(reporting.write(run_dir).path))
        warm = resumed.metrics[-1]
        est = estimate(cfg, prep, hw, warm=warm, eval_seconds=eval_seconds, eval_images=eval_images,
                       memory=memory, tta=tta)
        return CheckResult(Path(data), kept, stages.done, est, cfg, written, len(prep.rows.get("test", [])),
                           time.perf_counter() - t0)


def cache_note(prep: Prepared, hw: hardware.Hardware, cfg: Config) -> str:
    """Where the real run keeps the decoded images (hardware.place_cache)."""
    gb = prep.images.nbytes / 1e9
    if hw.device.type != "cuda":
        return f"the image cache ({gb:.2f} GB) is held in RAM"
    on_gpu = hardware.cache_on_gpu(prep.images.nbytes, hw, cfg.run.data_on_device)
    return (f"the image cache ({gb:.2f} GB) goes on the GPU besides the peak above (data_on_device="
            f"{cfg.run.data_on_device})" if on_gpu else f"the image cache ({gb:.2f} GB) stays in pinned RAM")


def estimate(cfg: Config, prep: Prepared, hw: hardware.Hardware, *, warm: dict, eval_seconds: float,
             eval_images: int, memory: dict, tta: int) -> Estimate:
    """The real run's cost from the check's second epoch (`warm`: its metrics row, kernels and memory
    already set up): steps and validation per epoch, the epochs, the final predictions."""
    d, b = cfg.data, cfg.run.batch_size
    steps_done = max(1, round(warm["train_images"] / b))
    # The steps with their augmentation: the epoch's wall time less its evaluation (on a GPU the step
    # timer reads the clock after a synchronize: trainer.StepTimer).
    step_s = max(1e-9, warm["seconds"] - warm["eval_seconds"]) / steps_done
    per_image = eval_seconds / max(1, eval_images)
    n_train, n_val, n_test = (len(prep.rows.get(k, ())) for k in ("train", "val", "test"))
    steps = n_train // b
    epoch_s = steps * step_s + n_val * per_image
    epochs = cfg.run.epochs if isinstance(cfg.run.epochs, int) else None  # epochs=auto: the run plans them
    run_s = None
    if epochs:  # planning's cost model: a step costs about its pixels; finish() scores validation and test
        timing = planning.Timing(step_s, d.image_size, n_val * per_image, 0.0, n_val, n_test, 0.0)
        schedule = Schedule(epochs, steps, b, cfg.optim, d)
        run_s = (planning.cost(epochs, timing, schedule) + (n_val + n_test) * per_image) * max(1, len(cfg.run.seeds))
    notes = estimate_notes(cfg, prep, hw, epoch_s=epoch_s, run_s=run_s, predict_s=n_test * (1 + tta) * per_image,
                           tta=tta)
    return Estimate(hardware.describe(hw), b, d.image_size, b / step_s, 1 / max(1e-9, per_image), steps, epoch_s, epochs,
                    run_s, int(memory.get("bytes", 0)), memory.get("source", "not measured"),
                    int(prep.images.nbytes), notes)


def estimate_notes(cfg: Config, prep: Prepared, hw: hardware.Hardware, *, epoch_s: float, run_s: float | None,
                   predict_s: float, tta: int) -> list[str]:
    """What to know besides the figures: seeds, progressive resizing, a time limit too short, TTA, the cache."""
    d, notes = cfg.data, []
    if cfg.run.seeds:
        notes.append(f"seeds={','.join(map(str, cfg.run.seeds))}: the whole run is {len(cfg.run.seeds)} runs, "
                     "one after another")
    if d.prog_scale < 1:
        first = optim.size_at(0, epochs=1, size=d.image_size, scale=d.prog_scale, end=d.prog_end)
        notes.append(f"progressive resizing: the smaller epochs are estimated from the full-size step by their "
                     f"pixels, and the peak memory was measured at the first epoch's {first} px (activations "
                     f"grow about {(d.image_size / first) ** 2:.1f}x by {d.image_size} px)")
    limit = config.parse_duration(cfg.run.time_limit)
    if limit and run_s and run_s > limit:
        fit = int(limit // max(1e-9, epoch_s))
        notes.append(f"time_limit={cfg.run.time_limit} would stop the run after about {fit} of its {cfg.run.epochs} "
                     f"epochs, with the learning rate still high: set epochs={max(1, fit)} or a longer limit")
    if tta:
        notes.append(f"imgcls predict --tta {tta}: about {predict_s:.0f} s for the {len(prep.rows.get('test', []))} "
                     "test images")
    notes.append(cache_note(prep, hw, cfg))
    if hw.device.type != "cuda":
        notes.append("CPU figures: on a GPU the run is much faster; run imgcls check there for its figures")
    return notes
