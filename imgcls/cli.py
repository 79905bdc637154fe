"""The command line: the only module that reads argv and prints. Exit 0 ok, 1 user error, 2 usage."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from imgcls import __version__
from imgcls.errors import UserError

# Per-layout defaults, under the user's YAML and key=value overrides.
LAYOUT_DEFAULTS = {
    "food-11": {"image_size": 128},
    "tiny-imagenet": {"image_size": 64},
    "imagefolder": {},
}

COMMANDS = {}


def command(fn):
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


def resolve_config(data: str | None, args) -> "config.Config":
    from imgcls import config, layouts

    defaults = LAYOUT_DEFAULTS[layouts.detect(Path(data).expanduser())] if data and Path(data).is_dir() else {}
    return config.resolve(defaults=defaults, file=getattr(args, "config", None), overrides=args.overrides)


def print_epoch(m: dict) -> None:
    from tqdm.auto import tqdm

    val = f" val_loss {m['val_loss']:.4f} val_acc {m['val_acc']:.4f}" if "val_acc" in m else ""
    tqdm.write(f"epoch {m['epoch']:>3}  train_loss {m['train_loss']:.4f} train_acc {m['train_acc']:.4f}{val}  "
               f"lr {m['lr']:.3g}  {m['seconds']:.1f}s  {m['images_per_second']:.0f} img/s "
               f"(data {m['data_seconds']:.1f}s, model {m['model_seconds']:.1f}s)")


def describe_dataset(ds) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in ds.counts().items())
    return f"{ds.root}: {ds.layout} layout, {ds.num_classes} classes, {counts}"


@command
def cmd_inspect(args) -> int:
    from imgcls import cache, data, layouts

    ds = layouts.read(args.data)
    print(describe_dataset(ds))
    names = ds.classes[:10]
    print(f"classes: {', '.join(names)}{' ...' if ds.num_classes > 10 else ''}")
    for w in ds.warnings:
        print(f"warning: {w}")
    cfg = resolve_config(args.data, args)
    samples, split_of = data.flatten(ds)
    built = cache.build([s.path for s in samples], size=cfg.data.cache_size or cfg.data.image_size,
                        resize=cfg.data.resize, cache_dir=cfg.data.cache_dir, workers=cfg.data.decode_workers,
                        name=f"{ds.layout}-{ds.root.name}")
    unreadable, skipped = data.sort_failures(samples, split_of, built.failed, strict=cfg.data.strict)
    for path, why in skipped.items():
        print(f"unreadable (train would skip it; strict=true makes it an error): {path}: {why}")
    errors = ds.errors + unreadable
    for e in errors:
        print(f"error: {e}")
    print(f"{len(built.failed)} unreadable file(s), {len(errors)} error(s)")
    return 1 if errors or built.failed else 0


@command
def cmd_train(args) -> int:
    started = time.time()  # time_limit= counts from here: decoding the cache is part of the session
    from imgcls import config, data, distributed, hardware, train

    rank, world, _ = distributed.from_env()  # under torchrun (README "Several GPUs"); rank 0 speaks for all
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    cfg = resolve_config(args.data, args)
    if cfg.run.seeds:
        if world > 1:
            raise UserError(f"seeds= runs whole trainings one after another (or one per GPU by itself); it does not "
                            f"combine with torchrun's {world} processes. Start `imgcls train ... seeds=...` without "
                            "torchrun, or train each seed=N with torchrun separately.")
        return train_seeds(args, cfg)
    source = train.resume_source(cfg, args.out)
    if source and (source / "config.yaml").is_file():
        # The run's own settings, so `--out RUN resume=RUN` alone continues it; key=value given now apply on top.
        cfg = config.resolve(defaults=config.load_yaml(source / "config.yaml"), file=args.config,
                             overrides=args.overrides)
        print(f"resuming from {source / 'state.pt'} with the settings in {source / 'config.yaml'}"
              f"{' and ' + ' '.join(args.overrides) if args.overrides else ''}")
    ranks = distributed.init(hardware.resolve(cfg.run).device)  # no process group without torchrun
    t_cache = time.time()
    with distributed.node_leader_first(ranks):  # one process per machine decodes; the others then reuse it
        prep = data.prepare(args.data, cfg, progress=cfg.run.progress and ranks.is_main)
    print(describe_dataset(prep.dataset))
    print(f"cache: {prep.cache_path} ({'built' if prep.cache_built else 'reused'} in {time.time() - t_cache:.1f}s)")
    if prep.skipped:
        print(f"skipped {len(prep.skipped)} unreadable training image(s):")
        for path, why in prep.skipped.items():
            print(f"  {path}: {why}")
    t0 = time.time()
    try:
        result = train.fit(cfg, prep, args.out, on_epoch=print_epoch, started=started, ranks=ranks)
        ranks.barrier()  # rank 0 alone writes logits and submission after the last epoch: tear down together
    finally:
        distributed.shutdown(ranks)
    print(f"best val_acc {result.best_val_acc:.4f} at epoch {result.best_epoch}, "
          f"final val_acc {result.final_val_acc:.4f}, {time.time() - t0:.0f}s")
    if result.stopped != "done":
        why = {"time_limit": f"to stay within time_limit={cfg.run.time_limit}", "interrupted": "on Ctrl-C"}
        print(f"stopped {why.get(result.stopped, result.stopped)} after {result.epochs_done} of {cfg.run.epochs} "
              f"epoch(s); the state is saved in {Path(args.out) / 'state.pt'}. Resume with:\n"
              f"  imgcls train {args.data} --out {args.out} resume={args.out}")
        if result.stopped == "time_limit" and not result.submission:
            print("no epoch finished within the time limit, so there are no best weights and no submission yet.")
    if result.submission:
        print(f"submission: {result.submission}")
    print(f"run: {result.run_dir}")
    if result.stopped != "interrupted" and ranks.is_main:
        auto_report(result.run_dir)
    return 0 if result.stopped != "interrupted" else 130


@command
def cmd_predict(args) -> int:
    from imgcls import config, data, hardware, predict, submission

    hw = hardware.resolve(config.RunConfig(device=args.device))
    members = [predict.member(r) for r in args.runs]
    weights = parse_weights(args.weights, len(members))
    preps = []  # (data settings, Prepared): runs trained at other image sizes need their own cache

    def prepared(cfg):
        for data_cfg, prep in preps:
            if data_cfg == cfg.data:
                return prep
        preps.append((cfg.data, data.prepare(args.data, cfg, progress=True)))
        return preps[-1][1]

    tta_weight = predict.TTA_WEIGHT if args.tta_weight is None else args.tta_weight
    tta = dict(tta=args.tta, tta_weight=tta_weight, tta_views=args.tta_views, hw=hw)
    parts = [predict.member_probs(m, prepared, split="test", **tta) for m in members]
    ids = parts[0].ids
    probs, preds = predict.ensemble([p.take(ids).probs for p in parts], method=args.ensemble, weights=weights)
    prep = preps[0][1]
    path = submission.write(prep.dataset, dict(zip(ids, preds.tolist())), args.out)
    predict.Probs(ids, prep.classes, probs).save(path.with_suffix(".probs.npz"))
    views = f"plain + {args.tta} {args.tta_views} TTA views (plain weight {tta_weight})" if args.tta else "plain view"
    if all(m.heldout for m in members):
        # Held-out predictions with the same views as the submission: from disk when plain, else recomputed.
        heldout = ([predict.load_probs(m.heldout) for m in members] if not args.tta else
                   [predict.member_probs(m, prepared, split="heldout", **tta) for m in members])
        report = predict.heldout_accuracy(heldout, method=args.ensemble, weights=weights) if all(heldout) else None
        if report and report["images"]:
            print(f"held-out accuracy, {views}, on the {report['images']} labelled images no run trained on:")
            for m, acc in zip(members, report["members"]):
                print(f"  {acc:.4f}  {m.path}{f' (out-of-fold, {len(m.runs)} folds)' if m.kind == 'cv' else ''}")
            if len(members) > 1:
                print(f"  {report['ensemble']:.4f}  ensemble ({args.ensemble})")
        elif report:
            print("no labelled image is held out from every run (e.g. folds of one cv): no held-out accuracy.")
    print(f"submission: {path} ({len(ids)} rows, {views}, {len(members)} run(s), ensemble {args.ensemble})")
    return 0


def parse_weights(text: str | None, n: int) -> list[float] | None:
    if not text:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights takes comma-separated numbers, one per run, e.g. 1,1,2; got {text!r}.") from None
    if len(weights) != n:
        raise UserError(f"--weights has {len(weights)} number(s) but {n} run(s) were given.")
    return weights


def run_jobs(names: list[str], dirs: list[Path], cfg, *, train_one, child_argv) -> dict[str, dict]:
    """Train each job (a fold or a seed): one subprocess per visible GPU when there are several
    (CUDA_VISIBLE_DEVICES=that GPU, output in DIR/log.txt), else one after the other in this process.
    Returns name -> outcome; prints one line per job."""
    from imgcls import cv

    gpus = cv.visible_gpus() if cfg.run.device != "cpu" else []
    outcomes = {}
    if len(gpus) > 1 and len(names) > 1:
        def started(i, gpu):
            print(f"{names[i]}: started on GPU {gpu}, log {dirs[i] / 'log.txt'}", flush=True)
        cv.run_parallel([(child_argv(i), dirs[i] / "log.txt") for i in range(len(names))], gpus, on_start=started)
        for name, d in zip(names, dirs):
            outcomes[name] = cv.read_outcome(d) or {"status": "failed", "error": f"it exited early; see {d / 'log.txt'}"}
            print_outcome(name, d, outcomes[name])
        return outcomes
    for i, (name, d) in enumerate(zip(names, dirs)):
        print(f"--- {name} ({i + 1}/{len(names)}): {d}", flush=True)
        outcomes[name] = train_one(i)
        print_outcome(name, d, outcomes[name])
        if outcomes[name]["status"] == "interrupted":
            break
    return outcomes


def print_outcome(name: str, run_dir: Path, o: dict) -> None:
    if o["status"] == "failed":
        print(f"{name}: FAILED after {o['seconds']:.0f}s: {o['error']} (traceback in {run_dir / 'error.txt'})")
    else:
        print(f"{name}: {o['status']}, best val_acc {o['best_val_acc']:.4f} at epoch {o['best_epoch']}, "
              f"final val_acc {o['final_val_acc']:.4f}, {o['seconds']:.0f}s")


def train_seeds(args, cfg) -> int:
    """`imgcls train ... seeds=1,2,3`: the same config once per seed into RUN/seed-<s>/ (exactly what
    `imgcls train --out RUN/seed-<s> seed=<s>` makes), then RUN/seeds.json with mean +- std."""
    from imgcls import config, cv, data

    out = Path(args.out)
    if cfg.run.resume:
        raise UserError("resume= does not apply to seeds=: rerun the same command, which resumes unfinished "
                        "seeds from their own run directories and skips finished ones.")
    cv.check_rerun_settings(out / "config.yaml", cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not args.train_only:
        (out / "config.yaml").write_text(config.to_yaml(cfg))
    done = [s for s in cfg.run.seeds if cv.is_done(out / f"seed-{s}")]
    if done:
        print(f"seed(s) {', '.join(map(str, done))} already finished in {out}: kept")
    todo = [s for s in cfg.run.seeds if s not in done]

    def train_one(i):
        seed_cfg = cv.with_seed(cfg, todo[i])
        prep = data.prepare(args.data, seed_cfg, progress=cfg.run.progress)
        return cv.train_job(seed_cfg, prep, out / f"seed-{todo[i]}", on_epoch=print_epoch)

    def child_argv(i):
        return [sys.executable, "-m", "imgcls", "train", args.data, "--out", str(out), "--config",
                str(out / "config.yaml"), "--train-only", f"seeds={todo[i]}", "progress=false"]

    outcomes = run_jobs([f"seed {s}" for s in todo], [out / f"seed-{s}" for s in todo], cfg,
                        train_one=train_one, child_argv=child_argv)
    if any(o["status"] == "interrupted" for o in outcomes.values()):
        return 130
    failed = [s for s in cfg.run.seeds if not cv.is_done(out / f"seed-{s}")]
    if failed:
        print(f"seed(s) {', '.join(map(str, failed))} did not finish; rerun the same command to train only those.")
        return 1
    if args.train_only:
        return 0
    summary = cv.summarize_seeds(out, cfg.run.seeds)
    f, b = summary["final_val_acc"], summary["best_val_acc"]
    print(f"seeds {','.join(map(str, cfg.run.seeds))}: final val_acc {f['mean']:.4f} +- {f['std']:.4f}, "
          f"best val_acc {b['mean']:.4f} +- {b['std']:.4f} (mean +- sample std over {f['n']} runs)")
    print(f"summary: {out / 'seeds.json'}")
    return 0


@command
def cmd_cv(args) -> int:
    import json

    from imgcls import config, cv, data, distributed

    if distributed.from_env()[1] > 1:
        raise UserError("imgcls cv does not run under torchrun: start it directly; with several GPUs it trains "
                        "one fold per GPU by itself.")
    out = Path(args.out)
    saved = out / "config.yaml"
    if saved.is_file():  # a rerun: the first run's settings, so unfinished folds train like the others
        cfg = config.resolve(defaults=config.load_yaml(saved), file=args.config, overrides=args.overrides)
    else:
        cfg = resolve_config(args.data, args)
    if cfg.run.resume:
        raise UserError("resume= does not apply to cv: rerun the same `imgcls cv` command, which resumes "
                        "unfinished folds and skips finished ones.")
    if cfg.run.seeds:
        raise UserError("seeds= repeats `imgcls train`; cv trains every fold with seed= (which also cuts the folds).")
    cv.check_rerun_settings(saved, cfg)
    folds_file = out / "folds.json"
    k = args.folds or (json.loads(folds_file.read_text())["k"] if folds_file.is_file() else 5)
    prep = data.prepare(args.data, cfg, progress=cfg.run.progress)
    plan = cv.make_plan(prep, out, k=k, seed=cfg.run.seed)
    if not args.train_only:
        saved.write_text(config.to_yaml(cfg))
        print(describe_dataset(prep.dataset))
        print(f"{k} stratified folds (seed {cfg.run.seed}) over {len(plan.rows)} labelled images "
              f"(train + val merged), about {len(plan.rows) // k} held out per fold")
    chosen = args.fold if args.fold else list(range(k))
    bad = [f for f in chosen if not 0 <= f < k]
    if bad:
        raise UserError(f"--fold {bad[0]} is not a fold of {out}: folds are 0..{k - 1}.")
    done = [f for f in chosen if cv.is_done(plan.fold_dir(f))]
    if done:
        print(f"fold(s) {', '.join(map(str, done))} already finished: kept")
    todo = [f for f in chosen if f not in done]

    def train_one(i):
        f = todo[i]
        return cv.train_job(cfg, prep, plan.fold_dir(f), rows=plan.fold_rows(f), on_epoch=print_epoch)

    def child_argv(i):
        return [sys.executable, "-m", "imgcls", "cv", args.data, "--out", str(out), "--folds", str(k),
                "--fold", str(todo[i]), "--train-only", "progress=false"]

    outcomes = run_jobs([f"fold {f}" for f in todo], [plan.fold_dir(f) for f in todo], cfg,
                        train_one=train_one, child_argv=child_argv)
    if any(o["status"] == "interrupted" for o in outcomes.values()):
        return 130
    failed = [f for f in chosen if not cv.is_done(plan.fold_dir(f))]
    for f in failed:
        print(f"fold {f} did not finish; rerun it alone with:\n"
              f"  imgcls cv {args.data} --out {out} --folds {k} --fold {f}")
    if args.train_only:
        return 1 if failed else 0
    missing = [f for f in range(k) if not cv.is_done(plan.fold_dir(f))]
    if missing:
        print(f"fold(s) {', '.join(map(str, missing))} of {k} are not finished; cv.json is written once all are.")
        return 1
    result = cv.collect_cv(prep, plan)
    for p in result["per_fold"]:
        print(f"fold {p['fold']}: acc {p['acc']:.4f} on {p['val_images']} held-out images (best epoch {p['best_epoch']})")
    fa = result["fold_acc"]
    print(f"cv: fold acc {fa['mean']:.4f} +- {fa['std']:.4f} (mean +- sample std over {k} folds), "
          f"out-of-fold acc {result['oof_acc']:.4f} on {result['labelled_images']} images")
    print(f"out-of-fold predictions: {out / 'oof.npz'}\nsummary: {out / 'cv.json'}")
    if result["submission"]:
        print(f"submission (mean of the {k} folds' probabilities): {out / result['submission']}")
    auto_report(out)
    return 0


def print_report(written) -> None:
    for note in written.notes:
        print(f"report: {note}")
    print(f"report: {written.path} ({len(written.files)} files in {written.seconds:.1f}s)")


def auto_report(run_dir: Path) -> None:
    """The report at the end of train and cv: the run is on disk already, so a failure here only warns."""
    from imgcls import report

    try:
        print_report(report.write(run_dir))
    except Exception as e:  # noqa: BLE001 - never lose a finished run to a plot
        print(f"warning: the report could not be written ({type(e).__name__}: {e}); the run itself is complete. "
              f"Retry with: imgcls report {run_dir}", file=sys.stderr)


@command
def cmd_report(args) -> int:
    from imgcls import report

    print_report(report.write(args.run))
    return 0


@command
def cmd_demo(args) -> int:
    from imgcls import demo

    t0 = time.time()
    result = demo.run(Path(args.out), overrides=args.overrides, on_epoch=print_epoch)
    print(f"demo: best val_acc {result.best_val_acc:.4f} (chance 0.10) in {time.time() - t0:.0f}s")
    print(f"submission: {result.submission}\nrun: {result.run_dir}")
    return 0


@command
def cmd_preview(args) -> int:
    from imgcls import data, preview

    if args.views < 1 or args.images < 1:
        raise UserError(f"--views and --images must be at least 1, got --views {args.views} --images {args.images}.")
    cfg = resolve_config(args.data, args)
    prep = data.prepare(args.data, cfg, progress=cfg.run.progress)
    shown = preview.render(prep, cfg, views=args.views, images=args.images)
    grid = preview.save(shown, args.out)
    size = cfg.data.image_size
    print(f"grid: {grid} ({len(shown.stems)} images x (eval view + {args.views} training views) at {size} px)")
    print(f"views: {Path(args.out) / 'views'}/<stem>_<k>.png, k = 0 the eval view, 1..{args.views} training views")
    for stem, n in zip(shown.stems, shown.distinct):
        print(f"  {stem}: {n} distinct training views of {args.views}")
    print(f"fewest distinct training views of one image: {min(shown.distinct)} of {args.views}")
    if shown.mixed:
        print("mixup/cutmix are on: training views blend in other rows' images, as in training")
    return 0


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="imgcls", description="Train image classifiers from scratch and write "
                                "correct competition submissions.")
    p.add_argument("--version", action="version", version=f"imgcls {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    class HelpConfig(argparse.Action):  # every key with its default, then exit (like --help)
        def __call__(self, parser, namespace, values, option_string=None):
            from imgcls import config
            print(config.describe())
            parser.exit()

    def overrides(sp):
        sp.add_argument("--config", help="YAML file of settings (see configs/)")
        sp.add_argument("--help-config", nargs=0, action=HelpConfig, help="list every key=value setting and its default")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. epochs=30 lr=0.1")

    sp = sub.add_parser("inspect", help="detect the layout, count images, list unreadable files")
    sp.add_argument("data")
    overrides(sp)
    sp = sub.add_parser("train", help="train a model and write the run directory and submission")
    sp.add_argument("data")
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)  # a child process of seeds=
    overrides(sp)
    sp = sub.add_parser("predict", help="write a submission from one or more trained runs")
    sp.add_argument("runs", nargs="+", metavar="RUN")
    sp.add_argument("--data", required=True)
    sp.add_argument("--out", required=True, help="submission CSV to write")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--tta", type=int, default=0, metavar="N", help="test-time views besides the plain one; 0 = plain")
    sp.add_argument("--tta-weight", type=float, default=None, metavar="W",
                    help="weight of the plain view: W * p(plain) + (1 - W) * mean over the N views (default 0.5)")
    sp.add_argument("--tta-views", default="fixed", choices=["fixed", "aug"],
                    help="fixed: flips and shifted crops (default, deterministic); aug: the run's training augmentation")
    sp.add_argument("--ensemble", default="mean", choices=["mean", "logits", "vote"],
                    help="combine runs: mean of probabilities, mean of logits, or majority vote (ties: summed probability)")
    sp.add_argument("--weights", metavar="W1,W2,...", help="one weight per run (default equal)")
    sp = sub.add_parser("cv", help="k-fold cross validation over train+val: one run per fold, out-of-fold "
                        "predictions, fold-ensemble submission")
    sp.add_argument("data")
    sp.add_argument("--out", required=True, help="cv directory (DIR/fold-k/ are run directories)")
    sp.add_argument("--folds", type=int, default=None, metavar="K", help="number of folds (default 5, or the saved K)")
    sp.add_argument("--fold", type=int, action="append", metavar="k",
                    help="train only this fold (repeatable); finished folds are always skipped")
    sp.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)  # a child process of a parallel run
    overrides(sp)
    sp = sub.add_parser("preview", help="write the eval view and N training views of a few images, and a grid")
    sp.add_argument("data")
    sp.add_argument("--out", required=True, help="directory for grid.png and views/")
    sp.add_argument("--views", type=int, default=8, metavar="N", help="training views per image (default 8)")
    sp.add_argument("--images", type=int, default=8, metavar="N",
                    help="training images, one per class in turn (default 8)")
    overrides(sp)
    sp = sub.add_parser("report", help="plots (curves, confusion matrix, per-class accuracy, mistakes) and one "
                        "self-contained report.html for a run or cv directory")
    sp.add_argument("run", metavar="RUN", help="a run directory (imgcls train --out) or a cv directory (imgcls cv --out)")
    sp = sub.add_parser("demo", help="train on a small dataset bundled with scikit-learn; no data needed")
    sp.add_argument("--out", required=True)
    sp.add_argument("overrides", nargs="*", metavar="key=value")
    return p, sub.choices


def main(argv: list[str] | None = None) -> int:
    top, commands = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in commands:
        top.parse_args(argv)  # --help, --version, or a usage error (exit 2)
    # Intermixed: `train DATA --out RUN epochs=3` and `train DATA epochs=3 --out RUN` both work.
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    from imgcls.malloc import keep_freed_memory  # torch-free: `imgcls inspect` does not import torch

    keep_freed_memory()  # this process is ours: reuse freed memory, no page faults per step
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"imgcls {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
