"""Seeded repeats, `seeds=1,2,3`: the same config once per seed into `RUN/seed-<s>/` (exactly what
`imgcls train --out RUN/seed-<s> seed=<s>` makes), then `RUN/seeds.json` with mean +- sample std
of the final and best validation accuracy."""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from imgcls import config, data, jobs
from imgcls.config import Config
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


def with_seed(cfg: Config, seed: int) -> Config:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed, seeds=()))


def run_seeds(data_root: str | Path, out: str | Path, cfg: Config, *, log: jobs.Log,
              on_epoch: Callable[[dict], None] | None = None, job: bool = False) -> RepeatsResult:
    """Train every seed of cfg.run.seeds not finished yet (one per GPU when there are several) and
    summarize them. `job`: this process is one GPU's child of such a run (train only, no summary)."""
    out = Path(out)
    if cfg.run.resume:
        raise UserError("resume= does not apply to seeds=: rerun the same command, which resumes unfinished "
                        "seeds from their own run directories and skips finished ones.")
    jobs.check_rerun_settings(out / "config.yaml", cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not job:
        (out / "config.yaml").write_text(config.to_yaml(cfg))
    result = RepeatsResult(out, list(cfg.run.seeds))
    result.kept = [s for s in cfg.run.seeds if jobs.is_done(out / f"seed-{s}")]
    if result.kept:
        log(f"seed(s) {', '.join(map(str, result.kept))} already finished in {out}: kept")
    todo = [s for s in cfg.run.seeds if s not in result.kept]

    def train_one(i):
        seed_cfg = with_seed(cfg, todo[i])
        prep = data.prepare(data_root, seed_cfg, progress=cfg.run.progress)
        return jobs.train_job(seed_cfg, prep, out / f"seed-{todo[i]}", on_epoch=on_epoch, log=log)

    def child_argv(i):
        return [sys.executable, "-m", "imgcls", "train", str(data_root), "--out", str(out), "--config",
                str(out / "config.yaml"), "--train-only", f"seeds={todo[i]}", "progress=false"]

    outcomes = jobs.run_jobs([f"seed {s}" for s in todo], [out / f"seed-{s}" for s in todo], cfg,
                             train_one=train_one, child_argv=child_argv, log=log)
    result.interrupted = any(o["status"] == "interrupted" for o in outcomes.values())
    result.failed = [s for s in cfg.run.seeds if not jobs.is_done(out / f"seed-{s}")]
    if not (result.interrupted or result.failed or job):
        summary = summarize_seeds(out, cfg.run.seeds)
        result.runs, result.final_val_acc, result.best_val_acc = summary["runs"], summary["final_val_acc"], summary["best_val_acc"]
        result.summary = out / "seeds.json"
    return result


def summarize_seeds(out: Path, seeds: tuple[int, ...]) -> dict:
    """RUN/seeds.json: each seed's outcome and mean +- std of its final and best val accuracy."""
    runs = [{"seed": s, "run": f"seed-{s}", **jobs.read_outcome(out / f"seed-{s}")} for s in seeds]
    summary = {"seeds": list(seeds), "runs": runs,
               "final_val_acc": jobs.mean_std([r["final_val_acc"] for r in runs]),
               "best_val_acc": jobs.mean_std([r["best_val_acc"] for r in runs])}
    (out / "seeds.json").write_text(json.dumps(summary, indent=2))
    return summary
