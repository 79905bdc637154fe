"""Seeded repeats, `seeds=1,2,3`: the same settings once per seed into `RUN/seed-<s>/`, each an ordinary
run (what `imgcls train --out RUN/seed-<s> seed=<s>` makes: report, logs, manifest), then
`RUN/seeds.json` with mean +- sample std of the final and best validation accuracy."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from imgcls import config, jobs, planning, reporting, run, rundir, tmpfiles
from imgcls.errors import UserError


@dataclass
class RepeatsResult:
    out: Path
    seeds: list[int]
    runs: list[dict] = field(default_factory=list)  # per seed: seed, run, and its outcome.json
    final_val_acc: dict | None = None  # mean, std (sample), n; None until every seed has finished
    best_val_acc: dict | None = None
    kept: list[int] = field(default_factory=list)  # seeds finished by an earlier run, not retrained
    failed: list[int] = field(default_factory=list)  # seeds that did not finish: rerun the same command
    interrupted: bool = False
    summary: Path | None = None  # seeds.json


def with_seed(resolved: config.Resolved, seed: int) -> config.Resolved:
    """One seed's settings: the group's, with seed= set (the keys the user gave stay given)."""
    return config.Resolved(config.with_values(resolved.cfg, seed=seed, seeds=()), resolved.given | {"seed"})


def run_seeds(data_root: str | Path, out: str | Path, resolved: config.Resolved, *, budget: planning.Budget,
              log: jobs.Log, on_epoch: Callable[[dict], None] | None = None) -> RepeatsResult:
    """Train every seed of cfg.run.seeds not finished yet (one per GPU when there are several) and
    summarize them; the seeds share `budget`."""
    out, cfg = Path(out), resolved.cfg
    if cfg.run.resume:
        raise UserError("resume= does not apply to seeds=: rerun the same command, which resumes unfinished "
                        "seeds from their own run directories and skips finished ones.")
    with jobs.open_group(out, "seeds", cfg):
        result = RepeatsResult(out, list(cfg.run.seeds))
        result.kept = [s for s in cfg.run.seeds if rundir.is_done(out / f"seed-{s}")]
        if result.kept:
            log(f"seed(s) {', '.join(map(str, result.kept))} already finished in {out}: kept")
        todo = [jobs.Job(f"seed {s}", run.spec_for(data_root, out / f"seed-{s}", with_seed(resolved, s), budget=budget))
                for s in cfg.run.seeds if s not in result.kept]
        outcomes = jobs.run_jobs(todo, cfg, log=log, on_epoch=on_epoch)
        result.interrupted = any(o["status"] == "interrupted" for o in outcomes.values())
        result.failed = [s for s in cfg.run.seeds if not rundir.is_done(out / f"seed-{s}")]
        if not (result.interrupted or result.failed):
            summary = summarize_seeds(out, cfg.run.seeds)
            result.runs, result.final_val_acc, result.best_val_acc = (summary["runs"], summary["final_val_acc"],
                                                                      summary["best_val_acc"])
            result.summary = out / "seeds.json"
    return result


def summarize_seeds(out: Path, seeds: tuple[int, ...]) -> dict:
    """RUN/seeds.json: each seed's outcome and mean +- std of its final and best val accuracy."""
    runs = [{"seed": s, "run": f"seed-{s}", **rundir.read_outcome(out / f"seed-{s}")} for s in seeds]
    summary = {"seeds": list(seeds), "runs": runs,
               "final_val_acc": reporting.spread([r["final_val_acc"] for r in runs]),
               "best_val_acc": reporting.spread([r["best_val_acc"] for r in runs])}
    tmpfiles.write_text(out / "seeds.json", json.dumps(summary, indent=2))
    return summary
