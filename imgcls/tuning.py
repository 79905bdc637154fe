"""`imgcls tune`: a budgeted search over the recipe on the user's own data, with Optuna as the engine (a TPE
sampler, successive halving over the per-epoch validation score as the pruner). Every trial is an
ordinary run folder, `TUNE/trial-<n>/` (run.run), so anything imgcls does with a run works on a trial.

The study lives in TUNE/study.log (Optuna's journal file storage), so the same command continues it
after a kill or in the next session; `--workers N` starts N processes that share it (one per GPU when
there are several), and `--storage postgresql://...` shares it between machines through a database.
A trial whose process died (kill -9) is marked failed by the next worker that looks, and its settings
are tried again. The objective is the final validation accuracy on a split fixed for the whole study
(`split_seed=`); the best trial is then trained again with other seeds (mean +- std), because the best
of N noisy scores is optimistic, and saved as TUNE/best.yaml, which `imgcls train --config` and
`imgcls cv --config` take as they are.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from imgcls import config, planning, recipes, rundir, tmpfiles
from imgcls.errors import UserError

Log = Callable[[str], None]

# The default search space, from the sweeps in BENCHMARKS.md ("Recipes", rounds 1-14): a key -> the choices
# (a list) or a range ({low, high}, `log: true` for a log scale). Fixing a key on the command line (lr=0.1)
# takes it out of the space.
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 0.024, "high": 0.384, "log": True},  # muon's 0.096 won at 5 epochs (0.048: -1.1, 0.024: -4.6)
    "weight_decay": {"low": 0.0125, "high": 0.2, "log": True},  # 0.05 default, never swept
    "aug": [name for _, name in recipes.AUG_BY_EPOCHS],  # aug=auto's presets, shortest budget first
    "label_smoothing": [0.0, 0.1, 0.2],  # 0.1 default (0 was -0.2 at 5 epochs, one seed)
    "mixup_alpha": [0.0, 0.2, 0.8],  # 'helps only for 80+ epochs' (fastai Imagenette); aug=auto mixes above 40 epochs (medium-mix)
    "ema": ["auto", 0.0],  # auto: +1.8 at 5 epochs
    "batch_size": [32, 64],  # 32 default; 64 1.6x less wall at 64 px, -1 point at 128 px (5 epochs)
}
STUDY_FILE, SETTINGS_FILE = "study.log", "tune.json"


@dataclass
class TuneResult:
    out: Path
    trials: dict[str, int]  # state -> count (complete, pruned, running, failed)
    best: dict | None = None  # number, value, params, run
    confirmed: dict | None = None  # mean, std, n: the best settings over the seeds (its own + the reruns)
    best_config: Path | None = None  # TUNE/best.yaml
    report: object | None = None
    report_error: str | None = None


# --- the space --------------------------------------------------------------------------------------

def read_space(path: str | Path | None, fixed: set[str]) -> dict[str, Any]:
    """The space to search: the default (or `path`'s YAML), less the keys fixed on the command line."""
    space = DEFAULT_SPACE if path is None else config.load_yaml(path)
    where = "the default space" if path is None else str(path)
    index = config.key_index()
    for key, spec in space.items():
        if key not in index:
            raise UserError(f"{where}: {key!r} is not a setting (`imgcls train --help-config` lists them).")
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{where}: {key} has an empty list of choices.")
            for value in spec:
                config.with_values(config.Config(), **{key: config.coerce_key(key, value)})  # a wrong value says so now
        elif not (isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "log", "step"}):
            raise UserError(f"{where}: {key} must be a list of choices or {{low: ..., high: ...}} (with log: true "
                            f"or step:), got {spec!r}.")
        elif not spec["low"] < spec["high"]:
            raise UserError(f"{where}: {key} needs low < high, got {spec['low']} and {spec['high']}.")
    space = {k: v for k, v in space.items() if k not in fixed}
    if not space:
        raise UserError(f"The search space is empty: {where} holds only keys fixed on the command line "
                        f"({', '.join(sorted(fixed))}). Leave some of them to the search.")
    return space


def sample(trial, space: dict[str, Any]) -> dict[str, Any]:
    """One trial's settings, drawn by Optuna's sampler from `space`."""
    params = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, spec)
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")),
                                              step=spec.get("step"))
    return params


# --- the study ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Study:
    """What a tune folder searches, saved as TUNE/tune.json so a rerun continues the same study."""
    data: str
    out: str
    base: dict[str, Any]  # the fixed settings: the config file's and the command line's, as key -> value
    space: dict[str, Any]
    trials: int  # complete + pruned trials to reach (0: until the time limit)
    deadline: float  # time.time() when no new trial may start (0: none)
    seed: int  # sampler seed, training seed and split seed of every trial
    storage: str  # "" = TUNE/study.log
    trial_seconds: float = 0.0  # imgcls check's estimate of one whole trial (with a deadline)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)

    def what_is_searched(self) -> dict:
        return {"data": self.data, "base": self.base, "space": self.space, "seed": self.seed}


def storage_of(study: Study):
    """Optuna's storage: the journal file in the tune folder, or a database URL. A database gets Optuna's
    heartbeat, so a trial whose machine died is failed and tried again there too."""
    import optuna

    if study.storage:
        return optuna.storages.RDBStorage(
            study.storage, heartbeat_interval=60, grace_period=180,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(study.out) / STUDY_FILE)))


def load_study(study: Study):
    import optuna

    epochs = int(study.base.get("epochs", 10))
    return optuna.create_study(
        study_name="imgcls", storage=storage_of(study), direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=study.seed + os.getpid() % 1000),  # workers draw apart
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, epochs // 9), reduction_factor=3))


FINISHED = ("COMPLETE", "PRUNED")


def counts(optuna_study) -> dict[str, int]:
    found: dict[str, int] = {}
    for t in optuna_study.get_trials(deepcopy=False):
        found[t.state.name.lower()] = found.get(t.state.name.lower(), 0) + 1
    return found


def fail_dead_trials(optuna_study, storage) -> None:
    """Running trials whose process has died on this machine (kill -9, a crash): failed, and their
    settings queued again, so the study neither waits for them nor loses them."""
    from optuna.trial import TrialState

    for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker") or {}
        if owner.get("host") == socket.gethostname() and not tmpfiles.alive(int(owner.get("pid", 0))):
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            if "retry_of" not in t.user_attrs:  # once: settings that kill a worker twice are not tried again
                optuna_study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def trial_settings(study: Study, params: dict[str, Any]) -> config.Resolved:
    return config.resolve_given(defaults=study.base, overrides={**params, "split_seed": study.seed,
                                                                 "seed": study.seed, "progress": False})


def objective(study: Study, log: Log):
    """Optuna's objective: one ordinary run in TUNE/trial-<n>/ with the sampled settings, reporting its
    validation accuracy every epoch (the pruner may stop it there); its value is the final accuracy."""
    import optuna

    from imgcls import run

    def trial_run(trial) -> float:
        trial.set_user_attr("run", f"trial-{trial.number}")
        params = sample(trial, study.space)
        out = Path(study.out) / f"trial-{trial.number}"

        def on_epoch(m: dict) -> str | None:
            trial.report(m["val_acc"], m["epoch"])
            return "pruned" if trial.should_prune() else None

        budget = planning.Budget(time.time(), 0.0)  # the deadline decides which trials start (whole_trial_fits),
        # not where one stops: a limit inside the trial would keep the run's finish reserve and cut it half-way
        log(f"trial {trial.number}: {' '.join(f'{k}={v}' for k, v in params.items())}")
        result = run.run(run.spec_for(study.data, out, trial_settings(study, params), budget=budget), on_epoch=on_epoch)
        trial.set_user_attr("epochs", result.epochs_done)
        if result.stopped == "pruned":
            log(f"trial {trial.number}: pruned after epoch {result.epochs_done} (val_acc {result.final_val_acc:.4f})")
            raise optuna.TrialPruned()
        if result.stopped != "done":
            raise RuntimeError(f"trial {trial.number} stopped early ({result.stopped}): not comparable")
        log(f"trial {trial.number}: val_acc {result.final_val_acc:.4f} after {result.epochs_done} epochs")
        return result.final_val_acc

    return trial_run


def work(study: Study, log: Log) -> None:
    """One worker: trials until the study has its count of finished ones or the deadline comes. Before
    each trial it fails the trials of dead workers and claims a place: a trial drawn beyond the count
    (another worker took the last place meanwhile) is given back as failed, so the count is exact."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_of(study)
    found = load_study(study)
    target = objective(study, log)
    while True:
        fail_dead_trials(found, storage)
        taken = found.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        if study.trials and len(taken) >= study.trials:
            return
        if study.deadline and not whole_trial_fits(found, study, log):
            return
        trial = found.ask()
        trial.set_user_attr("worker", {"pid": os.getpid(), "host": socket.gethostname()})
        ahead = [t for t in found.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                      TrialState.RUNNING)) if t.number < trial.number]
        if study.trials and len(ahead) >= study.trials:
            found.tell(trial, state=TrialState.FAIL)  # surplus: another worker took the last place
            return
        try:
            value = target(trial)
        except optuna.TrialPruned:
            found.tell(trial, state=TrialState.PRUNED)
        except Exception as e:  # noqa: BLE001 - one failed trial must not end the study
            log(f"trial {trial.number}: failed: {e}")
            found.tell(trial, state=TrialState.FAIL)
        else:
            found.tell(trial, value)


def whole_trial_fits(found, study: Study, log: Log) -> bool:
    """A trial starts only when a whole one fits before the deadline: the longest finished trial so far
    (imgcls check's estimate before there is one), with 10% to spare. A trial cut by the limit is a
    failed trial that told the search nothing, and its seconds are lost."""
    from optuna.trial import TrialState

    done = [t.duration.total_seconds() for t in found.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.duration is not None]
    need = 1.1 * (max(done) if done else study.trial_seconds)
    left = study.deadline - time.time()
    if left >= need:
        return True
    if left > 0:
        log(f"no new trial: {planning.duration(left)} left before the time limit, a whole trial takes "
            f"about {planning.duration(need)}")
    return False


# --- the command ------------------------------------------------------------------------------------

def plan_study(data: str | Path, out: Path, *, config_file, overrides: dict[str, Any], trials: int,
               time_limit: str, space_file, confirm: int, storage: str, started: float,
               one_trial: Callable[[], float], log: Log) -> Study:
    """The study this call runs: the fixed settings, the space, the trial count and the deadline for
    starting trials (the time limit less the confirmation runs, each the length of a trial)."""
    auto = str(overrides.get("epochs", "")).lower() == "auto"
    resolved = None if auto else config.for_data(data, config_file, overrides)
    if auto or resolved.cfg.run.epochs == "auto" or resolved.cfg.run.seeds:
        raise UserError("imgcls tune trains every trial for the same epochs=N (the pruner compares them epoch by "
                        "epoch): give epochs=N, not epochs=auto, and no seeds= (--confirm reruns the best).")
    flat = {k: v for section in resolved.cfg.to_dict().values() for k, v in section.items()}
    base = {k: flat[k] for k in sorted(resolved.given) if k not in ("time_limit", "resume", "seeds")}
    space = read_space(space_file, set(overrides))
    limit = config.parse_duration(time_limit)
    if not trials and not limit:
        trials = 20
    deadline = 0.0
    if limit:
        seconds = one_trial()
        need = (1 + confirm) * seconds
        if limit < need:
            raise UserError(f"--time-limit {time_limit} is too short: one trial takes about {planning.duration(seconds)} "
                            f"here (imgcls check's estimate for epochs={flat['epochs']}), and the search needs at least "
                            f"one trial and the {confirm} confirmation run(s) of the best: {planning.duration(need)}. "
                            "Raise --time-limit, or lower epochs= (or --confirm).")
        deadline = started + limit - confirm * seconds
    return Study(str(Path(data).resolve()), str(out.resolve()), base, space, trials, deadline, int(flat["seed"]),
                 storage, seconds if limit else 0.0)


def check_same_study(out: Path, study: Study) -> None:
    """A rerun continues the study only with the same data, fixed settings, space and seed."""
    saved_file = out / SETTINGS_FILE
    if not saved_file.is_file():
        return
    saved = Study(**json.loads(saved_file.read_text()))
    if saved.what_is_searched() != study.what_is_searched():
        changed = [k for k, v in study.what_is_searched().items() if saved.what_is_searched()[k] != v]
        raise UserError(f"{out} holds a study of other {', '.join(changed)}: its trials would not be comparable. "
                        "Repeat the first command's data, settings and --space, or choose a new --out.")


def run_workers(study: Study, workers: int, log: Log) -> list[int]:
    """`workers` processes (`python -m imgcls.tuning TUNE/tune.json`), one per visible GPU when there are
    GPUs; their output in TUNE/worker-<k>.log. Returns their exit codes."""
    from imgcls import jobs

    out, gpus = Path(study.out), jobs.visible_gpus() if study.base.get("device") != "cpu" else []
    procs, pids = [], {}
    for k in range(workers):
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpus[k % len(gpus)]} if gpus else {})}
        handle = open(out / f"worker-{k}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "imgcls.tuning", str(out / SETTINGS_FILE)], env=env,
                                       stdout=handle, stderr=subprocess.STDOUT), handle))
        pids[k] = procs[-1][0].pid
        log(f"worker {k}: pid {pids[k]}{f' on GPU {gpus[k % len(gpus)]}' if gpus else ''}, log {out / f'worker-{k}.log'}")
    tmpfiles.write_text(out / "workers.json", json.dumps(pids))
    codes: dict[int, int] = {}
    try:
        while len(codes) < len(procs):  # each as it ends: a dead one is said at once, and reaped
            for k, (proc, handle) in enumerate(procs):
                if k not in codes and proc.poll() is not None:
                    codes[k] = proc.returncode
                    handle.close()
                    if codes[k]:
                        log(f"worker {k} ended with exit status {codes[k]} (see {out / f'worker-{k}.log'}); the others go on")
            time.sleep(0.2)
    finally:
        for proc, handle in procs:
            if proc.poll() is None:  # interrupted: stop the workers we started
                proc.terminate()
                proc.wait()
            handle.close()
    return [codes[k] for k in sorted(codes)]


def trial_estimate(data, config_file, overrides: dict[str, Any]) -> float:
    """Seconds one trial takes here: imgcls check's estimate of the whole run with the fixed settings."""
    from imgcls import checking

    checked = checking.run_check(data, config.for_data(data, config_file, {**overrides, "progress": False}))
    return checked.estimate.run_seconds or 0.0


def run_study(data: str | Path, out: str | Path, *, config_file=None, overrides: dict[str, Any] | None = None,
              trials: int = 0, time_limit: str = "", space_file=None, workers: int = 1, storage: str = "",
              confirm: int = 2, log: Log = lambda text: None) -> TuneResult:
    """The whole command: plan (or continue) the study in `out`, run its workers until it has `trials`
    finished trials or the time limit comes, then rerun the best with `confirm` other seeds, write
    best.yaml and the report."""
    started, out, overrides = time.time(), Path(out), dict(overrides or {})
    require_optuna()
    rundir.check_owned(out, "tune")
    study = plan_study(data, out, config_file=config_file, overrides=overrides, trials=trials, time_limit=time_limit,
                       space_file=space_file, confirm=confirm, storage=storage, started=started,
                       one_trial=lambda: trial_estimate(data, config_file, overrides), log=log)
    with rundir.claim(out, "tune"):
        check_same_study(out, study)
        tmpfiles.write_text(out / SETTINGS_FILE, study.to_json())
        log(f"study {out / STUDY_FILE if not storage else storage}: {len(study.space)} settings searched "
            f"({', '.join(study.space)}), {f'{study.trials} trials' if study.trials else 'no trial count'}"
            f"{', until ' + time.strftime('%H:%M', time.localtime(study.deadline)) if study.deadline else ''}")
        if workers > 1:
            run_workers(study, workers, log)
        else:
            work(study, log)
        return finish_study(study, confirm, log)


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("imgcls tune needs Optuna: pip install optuna (or pip install 'imgcls[tune]').") from None


def finish_study(study: Study, confirm: int, log: Log) -> TuneResult:
    """The best trial's settings as best.yaml, confirmed over `confirm` more seeds; the report."""
    from optuna.trial import TrialState

    from imgcls import repeats, reporting

    out, found = Path(study.out), load_study(study)
    result = TuneResult(out, counts(found))
    if not found.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        log("no trial has finished yet: rerun the same command to continue the study")
        return result
    best = found.best_trial
    run_dir = out / best.user_attrs["run"]
    result.best = {"number": best.number, "value": best.value, "params": best.params, "run": str(run_dir)}
    result.best_config = out / "best.yaml"
    tmpfiles.write_text(result.best_config, f"# imgcls tune: trial {best.number} of {out}, final val_acc "
                        f"{best.value:.4f} (seed {study.seed})\n" + (run_dir / "config.yaml").read_text())
    values = [best.value]
    if confirm:
        seeds = tuple(study.seed + 1 + k for k in range(confirm))
        settings = trial_settings(study, best.params)
        log(f"confirming trial {best.number} with seeds {', '.join(map(str, seeds))}")
        reps = repeats.run_seeds(study.data, out / "confirm", config.Resolved(
            config.with_values(settings.cfg, seeds=seeds), settings.given | {"seeds"}),
            budget=planning.Budget(time.time(), 0.0), log=log)
        values += [r["final_val_acc"] for r in reps.runs] if reps.runs else []
    result.confirmed = reporting.spread(values)
    result.report, result.report_error = write_report(study, found, result)
    return result
# --- what a study shows ---------------------------------------------------------------------------

def trial_rows(found) -> list[dict]:
    return [{"trial": t.number, "state": t.state.name.lower(), "value": t.value, "epochs": t.user_attrs.get("epochs"),
             "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
             if t.datetime_complete and t.datetime_start else None, "params": t.params, "run": t.user_attrs.get("run")}
            for t in found.get_trials(deepcopy=False)]


def status(out: str | Path) -> dict:
    """Where the study in `out` stands: trial counts, the best so far, the running trials."""
    require_optuna()
    out = Path(out)
    if not (out / SETTINGS_FILE).is_file():
        raise UserError(f"{out} holds no study (no {SETTINGS_FILE}): give the --out of an `imgcls tune` command.")
    study = Study(**json.loads((out / SETTINGS_FILE).read_text()))
    found = load_study(study)
    rows = trial_rows(found)
    done = [r for r in rows if r["state"] == "complete"]
    best = max(done, key=lambda r: r["value"]) if done else None
    return {"study": study, "counts": counts(found), "best": best, "running": [r for r in rows if r["state"] == "running"],
            "rows": rows}


def write_report(study: Study, found, result: TuneResult):
    """TUNE/report.html: the trials table, the optimization history, each setting's importance and the
    best trials' validation curves. A failure only warns (the study is on disk)."""
    try:
        return render(study, found, result), None
    except Exception as e:  # noqa: BLE001 - never lose a study to a plot
        return None, f"the report could not be written ({type(e).__name__}: {e})"


def history_figure(out: Path, rows: list[dict]):
    """The optimization history (each finished trial and the best so far) and the best trials' curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from imgcls import reporting

    done = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: -r["value"])
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    ax[0].scatter([r["trial"] for r in done], [r["value"] for r in done], s=18, label="finished trial")
    best, line = -math.inf, []
    for r in sorted(done, key=lambda r: r["trial"]):
        best = max(best, r["value"])
        line.append((r["trial"], best))
    if line:
        ax[0].step(*zip(*line), where="post", color="C1", label="best so far")
    ax[0].set(xlabel="trial", ylabel="final val_acc", title="optimization history")
    ax[0].legend()
    for r in done[:5]:
        curve = reporting.read_metrics(out / r["run"])
        ax[1].plot([m["epoch"] for m in curve], [m.get("val_acc") for m in curve], label=f"trial {r['trial']}")
    ax[1].set(xlabel="epoch", ylabel="val_acc", title="the best trials")
    ax[1].legend()
    data = reporting.png(fig)
    plt.close(fig)
    return data


def render(study: Study, found, result: TuneResult) -> Path:
    import html

    from imgcls import reporting

    out, rows = Path(study.out), trial_rows(found)
    best = result.best
    summary = (f"best: trial {best['number']}, final val_acc {best['value']:.4f}; its settings over "
               f"{result.confirmed['n']} seeds {result.confirmed['mean']:.4f} ± {result.confirmed['std']:.4f} "
               f"(best.yaml)" if best else "no finished trial yet")
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>imgcls tune: {html.escape(out.name)}"
             f"</title><style>{reporting.CSS}</style></head><body><h1>imgcls tune: {html.escape(out.name)}</h1>",
             f"<p class=sub>{html.escape(summary)}; trials: {html.escape(json.dumps(result.trials))}</p>",
             reporting.img(history_figure(out, rows), "optimization history and the best trials' curves"),
             *importance_section(found), "<h2>Trials</h2>",
             reporting.table(["trial", "state", "final val_acc", "epochs", "seconds", *study.space],
                             [[r["trial"], r["state"], "" if r["value"] is None else f"{r['value']:.4f}",
                               r["epochs"] or "", "" if r["seconds"] is None else f"{r['seconds']:.0f}",
                               *(r["params"].get(k, "") for k in study.space)] for r in rows]),
             "<h2>Search space</h2>", f"<pre>{html.escape(yaml.safe_dump(study.space, sort_keys=False))}</pre>",
             "</body></html>\n"]
    path = out / "report.html"
    tmpfiles.write_text(path, "\n".join(parts))
    return path


def importance_section(found) -> list[str]:
    """Each setting's importance to the score (Optuna's default evaluator), once enough trials finished."""
    import warnings

    import optuna

    from imgcls import reporting

    try:
        with warnings.catch_warnings():  # "too few trials": said below instead
            warnings.simplefilter("ignore")
            importance = optuna.importance.get_param_importances(found)
    except Exception as e:  # noqa: BLE001 - too few trials, or a single setting
        return [f'<p class="note">Importance of each setting: not yet ({type(e).__name__}: {e}).</p>']
    n = len(found.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    return [f"<h2>Importance of each setting ({n} finished trials; equal when too few)</h2>",
            reporting.table(["setting", "importance"], [[k, f"{v:.3f}"] for k, v in importance.items()])]


def main(argv: list[str] | None = None) -> int:
    """A worker process: `python -m imgcls.tuning TUNE/tune.json`."""
    argv = sys.argv[1:] if argv is None else argv
    study = Study(**json.loads(Path(argv[0]).read_text()))
    try:
        work(study, lambda text: print(text, flush=True))
    except UserError as e:
        print(f"imgcls tune: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
