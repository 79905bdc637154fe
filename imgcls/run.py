"""One training, whoever asks for it. `imgcls train`, a notebook's imgcls.train, every seed of seeds=,
every fold of `imgcls cv` (in this process or in a child process on its own GPU), `imgcls check` and
the demo all call run() with a RunSpec, and get the same run directory: run() claims and locks the
folder, resumes or refuses, joins the torchrun ranks, prepares the data, settles the settings
(training.settle), fits, writes the predictions, the report and outcome.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from imgcls import config, planning, process, rundir
from imgcls.config import Config
from imgcls.errors import UserError, command_line

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunSpec:
    """Everything one training needs; to_json() carries it whole to a child process."""
    data: str  # the dataset folder
    out: str  # the run folder
    cfg: Config  # resolved; epochs=auto and the batch are settled by the run itself (training.settle)
    given: frozenset[str]  # the keys the user set (config.Resolved.given): a preset never changes them
    budget: planning.Budget  # the wall time this run may take (with runs_left: the whole command's)
    rows: dict[str, list[int]] | None = None  # a cv fold: the cache rows of each split; None: the dataset's
    report: bool = True  # write report.html at the end
    runs_left: int = 0  # one of a group (jobs.py): its share of `budget` is 1/runs_left of what is left at its start
    source: str | None = None  # the run folder it continues (rundir.resume_source); None: a fresh run

    def own_budget(self) -> planning.Budget:
        return self.budget.share(self.runs_left) if self.runs_left else self.budget

    def to_json(self) -> str:
        return json.dumps({"data": self.data, "out": self.out, "config": self.cfg.to_dict(), "given": sorted(self.given),
                           "budget": dataclasses.asdict(self.budget), "rows": self.rows, "report": self.report,
                           "runs_left": self.runs_left, "source": self.source})

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        d = json.loads(text)
        return cls(d["data"], d["out"], config.resolve(defaults=d["config"]), frozenset(d["given"]),
                   planning.Budget(**d["budget"]), d["rows"], d["report"], d["runs_left"], d["source"])


def spec_for(data: str | Path, out: str | Path, resolved: config.Resolved, *, budget: planning.Budget | None = None,
             rows: dict[str, np.ndarray] | None = None, report: bool = True, source: Path | None = None) -> RunSpec:
    """A RunSpec; `source` (else found here): the run folder it continues, if any."""
    cfg = resolved.cfg
    source = source or rundir.resume_source(cfg, out)
    return RunSpec(str(data), str(out), cfg, resolved.given, budget or planning.Budget.of(cfg.run.time_limit),
                   {k: [int(i) for i in v] for k, v in rows.items()} if rows is not None else None, report,
                   source=str(source) if source else None)


def auto_report(run_dir: Path):
    """The report at the end of a run: the run is on disk already, so a failure here only warns.
    Returns (reporting.Report or None, the warning or None)."""
    from imgcls import reporting

    try:
        return reporting.write(run_dir), None
    except Exception as e:  # noqa: BLE001 - never lose a finished run to a plot
        message = (f"the report could not be written ({type(e).__name__}: {e}); the run itself is complete. "
                   f"Retry with: {command_line('report', run_dir)}")
        warnings.warn(message, stacklevel=3)
        return None, message


def run(spec: RunSpec, *, prep=None, log: Log = lambda text: None, on_epoch: Callable[[dict], None] | None = None):
    """Train one run into spec.out and return its training.TrainResult. `prep`: the data prepared already
    (a cv's folds share it, `imgcls check` passes a few images of it); else prepared here. A refusal
    (another process holds the folder, other data or settings) writes nothing; an exception once training
    has started is recorded in outcome.json and error.txt, then raised."""
    from imgcls import distributed, hardware

    t0, budget = time.time(), spec.own_budget()
    process.tune()  # the allocator and threads of a training process, from the CLI and from Python alike
    out = Path(spec.out)
    hw = hardware.resolve(spec.cfg.run)
    for note in hw.notes:
        log(note)
    ranks = distributed.init(hw.device)  # no process group without torchrun
    try:
        with contextlib.ExitStack() as held:
            refused = None
            if ranks.is_main:  # rank 0 owns the folder for all ranks; the others learn whether it could
                try:
                    held.enter_context(rundir.claim(out, "train"))
                except UserError as e:
                    refused = str(e)
            refused = ranks.gather(refused)[0]
            if refused:
                raise UserError(refused)
            source, prep, rows = _open(spec, out, ranks, prep=prep, log=log)
            if source == out and not spec.cfg.run.resume and rundir.is_done(out):
                return finished_result(out, log)
            try:
                with process.cpu_threads(spec.cfg.run.threads, device=hw.device.type,
                                         deterministic=spec.cfg.run.deterministic) as tuner:
                    result = _train(spec, out, hw, ranks, budget=budget, source=source, prep=prep, rows=rows, log=log,
                                    on_epoch=on_epoch, tuner=tuner)
                ranks.barrier()  # rank 0 alone writes logits and submission after the last epoch: tear down together
            except BaseException as e:
                if ranks.is_main and not isinstance(e, KeyboardInterrupt):
                    failed(out, e, time.time() - t0)
                raise
            result.seconds = time.time() - t0
            if ranks.is_main:
                finish_run(spec, result)
    finally:
        distributed.shutdown(ranks)
    return result


def failed(out: Path, e: BaseException, seconds: float) -> None:
    """outcome.json says the run failed and why; error.txt keeps the traceback."""
    from imgcls import tmpfiles

    tmpfiles.write_text(out / "error.txt", traceback.format_exc())
    message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    tmpfiles.write_text(out / rundir.OUTCOME, json.dumps({"status": "failed", "error": message,
                                                          "seconds": round(seconds, 1)}, indent=2))


def finish_run(spec: RunSpec, result) -> None:
    """After training: the report (a run a signal stopped keeps its state and writes no report) and outcome.json."""
    from imgcls import tmpfiles

    if result.stopped != "interrupted" and spec.report:
        result.report, result.report_error = auto_report(result.run_dir)
    outcome = {"status": result.stopped, "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch,
               "final_val_acc": result.final_val_acc, "epochs": result.epochs_done, "seconds": round(result.seconds, 1)}
    tmpfiles.write_text(result.run_dir / rundir.OUTCOME, json.dumps(outcome, indent=2))


def _prepare(spec: RunSpec, ranks, log: Log):
    from imgcls import data as datalib, distributed, finetune

    t_cache = time.time()
    with distributed.node_leader_first(ranks):  # one process per machine decodes; the others then reuse it
        prep = datalib.prepare(spec.data, spec.cfg, progress=spec.cfg.run.progress and ranks.is_main)
    log(prep.dataset.describe())
    log(f"cache: {prep.cache_path} ({'built' if prep.cache_built else 'reused'} in {time.time() - t_cache:.1f}s)")
    if prep.before_subset:
        log(datalib.subset_line(prep, spec.cfg))
    if spec.cfg.model.init and prep.dataset.layout == "food-11":
        log(f"warning: init={spec.cfg.model.init}: {finetune.RULES}.")
    return prep


def _open(spec: RunSpec, out: Path, ranks, *, prep, log: Log):
    """What the run continues from (or None), its data and rows; refuses a folder of other data or
    settings before anything is written. Returns (source, prep, rows)."""
    cfg, source = spec.cfg, Path(spec.source) if spec.source else None
    prep = prep or _prepare(spec, ranks, log)
    rows = {k: np.asarray(v, dtype=np.int64) for k, v in spec.rows.items()} if spec.rows is not None else prep.rows
    if prep.skipped:
        log(f"skipped {len(prep.skipped)} unreadable training image(s):")
        for path, why in prep.skipped.items():
            log(f"  {path}: {why}")
    if source == out and not cfg.run.resume:
        rundir.check_bound(out, cfg, prep)
    return source, prep, rows


def _train(spec: RunSpec, out: Path, hw, ranks, *, budget: planning.Budget, source: Path | None, prep,
           rows: dict[str, np.ndarray], log: Log, on_epoch, tuner: process.ThreadTuner | None = None):
    """Settle, fit, finish: the run itself, in a claimed folder."""
    from imgcls import finetune, hardware, training

    cfg = spec.cfg
    files = rundir.RunFiles(out, ranks)
    images = hardware.place_cache(prep.images, hw, cfg.run.data_on_device)
    saved_plan = json.loads((source / "plan.json").read_text()) if source and (source / "plan.json").is_file() else None
    settled = training.settle(cfg, spec.given, prep=prep, rows=rows, images=images, hw=hw, ranks=ranks, files=files,
                              budget=budget, saved_plan=saved_plan, resuming=source is not None, log=log)
    loop = training.new_loop(settled, prep, rows, images, hw, ranks, tuner=tuner)
    if loop.state.pretrained and ranks.is_main:
        log(finetune.init_line(loop.state.pretrained, prep.dataset.num_classes))
    if source:
        rundir.resume(loop.state, files, source)
        state, epochs = loop.state, settled.schedule.epochs
        where = f"epoch {state.epoch + 1}" + (f", step {state.step}" if state.step else "") + f" of {epochs}"
        if state.epoch >= epochs:
            where = f"all {epochs} epochs are trained; the predictions and report follow"
        log(f"resuming from {source / 'state.pt'}: {where}")
    files.start(settled.cfg, prep, rows, hw, loop.state)
    if settled.plan is not None:
        files.save_plan(settled.cfg, settled.plan)
    stopped = training.fit(loop, files, budget=budget, plan=settled.plan, out=out, on_epoch=on_epoch, log=log)
    m = files.metrics
    result = training.TrainResult(out, loop.state.best_acc, m[-1].get("val_acc", float("nan")) if m else float("nan"),
                                  loop.state.best_epoch, len(m), stopped, m,
                                  config=config.with_values(settled.cfg, epochs=loop.schedule.epochs))
    if stopped != "interrupted" and ranks.is_main and (out / "best.safetensors").is_file():
        with training.user_errors(cfg, out):
            result.submission = training.finish(out, prep, rows, hw, loop.state.eval_model, settled.cfg,
                                                images=loop.images)
    return result


def finished_result(out: Path, log: Log):
    """A run started again in its finished folder with its own settings: its figures, nothing trained."""
    from imgcls import training

    outcome = rundir.read_outcome(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    log(f"{out} is finished ({outcome['epochs']} epochs, best val_acc {outcome['best_val_acc']:.4f} at epoch "
        f"{outcome['best_epoch']}): nothing to train. To train more, add {shlex.quote(f'resume={out}')} and a "
        "larger epochs=.")
    submission = out / "submission.csv"
    return training.TrainResult(out, outcome["best_val_acc"], outcome["final_val_acc"], outcome["best_epoch"],
                                outcome["epochs"], "done", metrics, submission if submission.is_file() else None,
                                seconds=0.0, config=config.resolve(file=out / "config.yaml"), finished_before=True)
