"""The Python API: each `imgcls` command as a function that returns its figures as data, for notebooks
and scripts (`import imgcls; imgcls.train(...)`). The CLI is argv -> these functions -> print.

Settings are the same keys as `key=value` on the command line, given as keyword arguments
(`imgcls.train(data, out, epochs=5, model="resnet18s")`). Mistakes raise imgcls.UserError with the
message the CLI prints. `verbose=True` (the default) writes the progress lines the CLI shows (dataset,
cache, one line per epoch or job) above the tqdm.auto progress bars, which a notebook shows as
widgets; `verbose=False` and `progress=False` silence them.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from imgcls.errors import UserError

def _logger(verbose: bool) -> Callable[[str], None]:
    """Progress lines above any tqdm bar (a notebook keeps both), flushed so child logs interleave right."""
    if not verbose:
        return lambda text: None

    def log(text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text)
        sys.stdout.flush()
    return log


def _epoch_logger(log: Callable[[str], None]) -> Callable[[dict], None]:
    from imgcls.training import epoch_line

    return lambda m: log(epoch_line(m))


def _hardware(cfg, log: Callable[[str], None]):
    """A command's hardware.Hardware, resolved before the cache is decoded: a GPU this torch cannot run is
    refused here (UserError), and a setting it changes (compile=true on a GPU Triton cannot run) is logged.
    (A single run resolves its own: run.run.)"""
    from imgcls import hardware

    hw = hardware.resolve(cfg.run)
    for note in hw.notes:
        log(note)
    return hw


# --- inspect ---------------------------------------------------------------------------------------

@dataclass
class InspectResult:
    root: Path
    layout: str  # food-11 | tiny-imagenet | imagefolder
    classes: list[str]
    counts: dict[str, int]  # split -> images
    warnings: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # training/validation file -> why (train skips it)
    errors: list[str] = field(default_factory=list)  # what would make the submission wrong
    failed: int = 0  # unreadable files, in every split

    @property
    def ok(self) -> bool:
        return not self.errors and not self.failed

    def describe(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"{self.root}: {self.layout} layout, {len(self.classes)} classes, {counts}"


def inspect(data: str | Path, *, config: str | Path | None = None, **overrides) -> InspectResult:
    """Detect the layout, count classes and images per split, decode every image once (into the cache
    training reuses) and list what cannot be read or would make the submission wrong."""
    from imgcls import cache, config as configs, data as datalib, layouts

    ds = layouts.read(data)
    cfg = configs.for_data(data, config, overrides).cfg
    samples, split_of = datalib.flatten(ds)
    built = cache.build([s.path for s in samples], size=configs.cache_size(cfg.data),
                        resize=cfg.data.resize, cache_dir=cfg.data.cache_dir, workers=cfg.data.decode_workers,
                        progress=cfg.run.progress, name=f"{ds.layout}-{ds.root.name}")
    unreadable, skipped = datalib.sort_failures(samples, split_of, built.failed, strict=cfg.data.strict)
    return InspectResult(ds.root, ds.layout, ds.classes, ds.counts(), list(ds.warnings), skipped,
                         ds.errors + unreadable, len(built.failed))


# --- train ---------------------------------------------------------------------------------------

def train(data: str | Path, out: str | Path, *, config: str | Path | None = None, verbose: bool = True,
          **overrides):
    """Train a model into the run directory `out` and write its submission and report; returns a
    TrainResult. With seeds=(1, 2, 3): one run per seed in out/seed-<s>/, returns a RepeatsResult.
    A second call with the same `out` resumes it from its state.pt (resume=RUN: from another run).
    Under torchrun every process calls this; rank 0 writes the run. time_limit= counts from this call:
    decoding the cache is part of the session."""
    started = time.time()
    from imgcls import config as configs, distributed, planning, repeats, rundir, run

    log = _logger(verbose)
    resolved = configs.for_data(data, config, overrides)
    budget = planning.Budget.of(resolved.cfg.run.time_limit, started)
    if resolved.cfg.run.seeds:
        world = distributed.from_env()[1]
        if world > 1:
            raise UserError(f"seeds= runs whole trainings one after another (or one per GPU by itself); it does not "
                            f"combine with torchrun's {world} processes. Start `imgcls train ... seeds=...` without "
                            "torchrun, or train each seed=N with torchrun separately.")
        return repeats.run_seeds(data, out, resolved, budget=budget, log=log, on_epoch=_epoch_logger(log))
    source = rundir.resume_source(resolved.cfg, out)
    if source and (source / "config.yaml").is_file():
        # The run's own settings, so `--out RUN resume=RUN` alone continues it; settings given now apply on top.
        resolved = configs.resolve_given(defaults=configs.load_yaml(source / "config.yaml"), file=config,
                                         overrides=overrides)
        budget = planning.Budget.of(resolved.cfg.run.time_limit, started)
        given = " ".join(f"{k}={v}" for k, v in overrides.items())
        log(f"settings: {source / 'config.yaml'}{', and ' + given if given else ''}")
    return run.run(run.spec_for(data, out, resolved, budget=budget, source=source), log=log, on_epoch=_epoch_logger(log))


# --- check ----------------------------------------------------------------------------------------

def check(data: str | Path, *, config: str | Path | None = None, out: str | Path | None = None, tta: int = 0,
          tta_weight: float = 0.5, tta_views: str = "fixed", steps: int = 1, verbose: bool = True, **overrides):
    """Every stage of a real run with these settings (train's keys) on a few of data's images, in seconds:
    layout, model, training steps at the real batch size, evaluation, checkpoint and resume, test
    inference with the TTA predict would use (`tta`, `tta_weight`, `tta_views`), the submission, the
    report. Returns a checking.CheckResult with each stage's time and what the real run would cost here.
    A UserError is what the real run would stop with. `out`: keep what it wrote there (else a
    temporary folder, deleted); `steps`: training steps per check epoch (two epochs)."""
    from imgcls import checking, config as configs

    log = _logger(verbose)
    resolved = configs.for_data(data, config, overrides)
    return checking.run_check(data, resolved, out=out, tta=tta, tta_weight=tta_weight, tta_views=tta_views, steps=steps,
                            log=log, on_epoch=_epoch_logger(log))


# --- cv ------------------------------------------------------------------------------------------

def cv(data: str | Path, out: str | Path, *, folds: int | None = None, fold: int | list[int] | None = None,
       refit: bool = False, submit: str | None = None, config: str | Path | None = None, verbose: bool = True,
       **overrides):
    """K-fold cross validation over train + validation merged: one run per fold in out/fold-k/, the
    out-of-fold predictions, cv.json and the fold-mean submission; returns a CvResult. `folds`: K
    (default 5, or the K an earlier call saved in `out`); `fold`: train only these folds. A second
    call trains only the folds that have not finished, with the first call's settings. `refit`: then
    a final fit on every labelled image for the folds' mean best epoch count (out/refit/);
    `submit="folds"|"refit"`: which out/submission.csv is (default: the refit's when there is one).
    time_limit= is for the whole call: the folds (and the refit) share it."""
    started = time.time()
    from imgcls import config as configs, crossval, distributed, planning

    if distributed.from_env()[1] > 1:
        raise UserError("imgcls cv does not run under torchrun: start it directly; with several GPUs it trains "
                        "one fold per GPU by itself.")
    log = _logger(verbose)
    out = Path(out)
    resolved = crossval.settings(out, lambda defaults: configs.for_data(data, config, overrides, defaults=defaults))
    _hardware(resolved.cfg, log)
    only = [fold] if isinstance(fold, int) else fold
    result = crossval.run_cv(data, out, resolved, budget=planning.Budget.of(resolved.cfg.run.time_limit, started),
                             folds=folds, only=only, log=log, on_epoch=_epoch_logger(log), refit=refit, submit=submit)
    if result.summary:
        from imgcls import run

        result.report, result.report_error = run.auto_report(out)
    return result


# --- tune ---------------------------------------------------------------------------------------

def tune(data: str | Path, out: str | Path, *, trials: int = 0, time_limit: str = "", space: str | Path | None = None,
         workers: int = 0, storage: str = "", confirm: int = 2, config: str | Path | None = None, verbose: bool = True,
         **overrides):
    """Search the recipe on this data with Optuna (TPE, successive-halving pruning) into `out`: a trial
    is an ordinary run in out/trial-<n>/, the study is out/study.log (or `storage`, a database URL), and
    a second call continues it. `trials`: finished trials to reach (default 20 without `time_limit`);
    `space`: a YAML search space (default tuning.DEFAULT_SPACE; keys given here as overrides are fixed);
    `workers`: processes sharing the study (default one per GPU, else 1); `confirm`: other seeds the best
    is trained again with. Returns a tuning.TuneResult (best, confirmed mean +- std, best.yaml, report)."""
    from imgcls import jobs, tuning

    if workers < 0 or confirm < 0 or trials < 0:
        raise UserError(f"--workers, --confirm and --trials are 0 or more, got {workers}, {confirm}, {trials}.")
    if not workers:
        gpus = jobs.visible_gpus() if overrides.get("device") != "cpu" else []
        workers = max(1, len(gpus))
    return tuning.run_study(data, out, config_file=config, overrides=overrides, trials=trials, time_limit=time_limit,
                            space_file=space, workers=workers, storage=storage, confirm=confirm, log=_logger(verbose))


def tune_status(out: str | Path) -> dict:
    """Where the study in `out` stands (tuning.status): counts, the best so far, running trials."""
    from imgcls import tuning

    return tuning.status(out)


# --- predict, report, preview, demo ----------------------------------------------------------------

def predict(runs, data: str | Path, out: str | Path, *, tta: int = 0, tta_weight: float = 0.5, tta_views: str = "fixed",
            ensemble: str = "mean", weights: str | list[float] | None = None, device: str = "auto",
            progress: bool = True):
    """A submission from one or more run / cv directories (`runs`), with `tta` test-time views and an
    ensemble of the members; returns a PredictResult (held-out accuracy of each member and of the
    ensemble, when they have held-out predictions)."""
    from imgcls import config as configs, ensemble as ensembles, hardware

    if device not in configs.CHOICES["device"]:
        raise UserError(f"device={device!r} is not one of {', '.join(configs.CHOICES['device'])}.")
    hw = hardware.resolve(configs.RunConfig(device=device))
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    return ensembles.predict_runs(runs, data, out, hw=hw, tta=tta, tta_weight=tta_weight, tta_views=tta_views,
                                  method=ensemble, weights=weights, progress=progress)


def write_report(run: str | Path):
    """Plots and report.html for a run or cv directory: the reporting.Report (files, notes, figures)."""
    from imgcls import reporting

    return reporting.write(run)


def report(run: str | Path) -> Path:
    """Write the report of a run or cv directory; returns the path of its report.html."""
    return write_report(run).path


def render_preview(data: str | Path, out: str | Path, *, views: int = 8, images: int = 8,
                   config: str | Path | None = None, **overrides):
    """The evaluation view and `views` training views of `images` training images, drawn by the
    training code, as PNGs in out/views/ and one grid; returns previewing.Preview with the grid path."""
    from imgcls import config as configs, data as datalib, previewing

    if views < 1 or images < 1:
        raise UserError(f"--views and --images must be at least 1, got --views {views} --images {images}.")
    cfg = configs.for_data(data, config, overrides).cfg
    prep = datalib.prepare(data, cfg, progress=cfg.run.progress)
    shown = previewing.render(prep, cfg, views=views, images=images)
    previewing.save(shown, out)
    return shown


def preview(data: str | Path, out: str | Path, *, views: int = 8, images: int = 8, config: str | Path | None = None,
            **overrides) -> Path:
    """What the model sees (see render_preview); returns the grid's path, to show inline."""
    return render_preview(data, out, views=views, images=images, config=config, **overrides).grid_path


def models(*, sizes: tuple[int, ...] = (64, 128), speed: bool = True, device: str = "auto", batch: int | None = None):
    """Every registered model: parameters, forward GFLOPs per image at `sizes`, and (speed=True)
    training images/s measured on this machine with a run's precision, memory format and (batch=None)
    batch size at each size."""
    from imgcls import config as configs, hardware
    from imgcls.models.profile import profile

    hw = hardware.resolve(configs.RunConfig(device=device)) if speed else None
    return profile(sizes=tuple(sizes), hw=hw, batch=batch)


def demo(out: str | Path, *, verbose: bool = True, **overrides):
    """Lay out scikit-learn's bundled digits as a food-11 folder in out/data and train on them into out/run."""
    from imgcls import digits

    log = _logger(verbose)
    return digits.train_demo(Path(out), overrides=overrides, log=log, on_epoch=_epoch_logger(log))
