"""The command line: argv -> the Python API (imgcls/api.py) -> print. The only module that reads argv;
exit 0 ok, 1 user error, 2 usage, 130 interrupted."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from imgcls import __version__
from imgcls.errors import UserError, command_line

COMMANDS = {}


def command(fn):
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


def overrides(args) -> dict[str, str]:
    from imgcls import config

    return config.parse_overrides(getattr(args, "overrides", None) or [])


def print_report(written, error: str | None = None) -> None:
    if error:
        print(f"warning: {error}", file=sys.stderr)
        return
    for note in written.notes:
        print(f"report: {note}")
    print(f"report: {written.path} ({len(written.files)} files in {written.seconds:.1f}s)")


@command
def cmd_inspect(args) -> int:
    from imgcls import api

    found = api.inspect(args.data, config=args.config, **overrides(args))
    print(found.describe())
    names = found.classes[:10]
    print(f"classes: {', '.join(names)}{' ...' if len(found.classes) > 10 else ''}")
    for w in found.warnings:
        print(f"warning: {w}")
    for path, why in found.unreadable.items():
        print(f"unreadable (train would skip it; strict=true makes it an error): {path}: {why}")
    for e in found.errors:
        print(f"error: {e}")
    print(f"{found.failed} unreadable file(s), {len(found.errors)} error(s)")
    return 0 if found.ok else 1


@command
def cmd_train(args) -> int:
    from imgcls import api, distributed

    rank, _, _ = distributed.from_env()  # under torchrun (README "Several GPUs"); rank 0 speaks for all
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    result = api.train(args.data, args.out, config=args.config, **overrides(args))
    if not hasattr(result, "stopped"):
        return print_seeds(result)
    if result.config and result.config.data.holdout == "none":
        print(f"trained on every labelled image (holdout=none): no validation score; the weights of epoch "
              f"{result.best_epoch} are kept, {result.seconds:.0f}s")
    else:
        print(f"best val_acc {result.best_val_acc:.4f} at epoch {result.best_epoch}, "
              f"final val_acc {result.final_val_acc:.4f}, {result.seconds:.0f}s")
    if result.stopped != "done":
        cfg = result.config
        why = {"time_limit": f"to stay within time_limit={cfg.run.time_limit}",
               "interrupted": "on a signal (Ctrl-C or SIGTERM)"}
        print(f"stopped {why.get(result.stopped, result.stopped)} after {result.epochs_done} of {cfg.run.epochs} "
              f"epoch(s); the state is saved in {Path(args.out) / 'state.pt'}. Resume with:\n"
              f"  {command_line('train', args.data, '--out', args.out, f'resume={args.out}')}")
        if result.stopped == "time_limit" and not result.submission:
            print("no epoch finished within the time limit, so there are no best weights and no submission yet.")
    if result.submission:
        print(f"submission: {result.submission}")
    print(f"run: {result.run_dir}")
    if result.report or result.report_error:
        print_report(result.report, result.report_error)
    return 0 if result.stopped != "interrupted" else 130


def print_seeds(result) -> int:
    if result.interrupted:
        return 130
    if result.failed:
        print(f"seed(s) {', '.join(map(str, result.failed))} did not finish; rerun the same command to train only those.")
        return 1
    f, b = result.final_val_acc, result.best_val_acc
    print(f"seeds {','.join(map(str, result.seeds))}: final val_acc {f['mean']:.4f} +- {f['std']:.4f}, "
          f"best val_acc {b['mean']:.4f} +- {b['std']:.4f} (mean +- sample std over {f['n']} runs)")
    print(f"summary: {result.summary}")
    return 0


@command
def cmd_predict(args) -> int:
    from imgcls import api

    tta_weight = {} if args.tta_weight is None else {"tta_weight": args.tta_weight}
    result = api.predict(args.runs, args.data, args.out, tta=args.tta, tta_views=args.tta_views,
                         ensemble=args.ensemble, weights=args.weights, device=args.device, **tta_weight)
    if result.fitted:
        fit = result.fitted
        print(f"weights fitted by log loss on the {fit['images']} held-out images all runs share: "
              + ", ".join(f"{w:.3f}" for w in result.weights)
              + f" (log loss {fit['fitted']['log_loss']:.4f}, accuracy {fit['fitted']['accuracy']:.4f}; equal weights "
              f"{fit['equal']['log_loss']:.4f}, {fit['equal']['accuracy']:.4f}; fitted on these images, so optimistic)")
    held = result.heldout
    if held and held["images"]:
        print(f"held-out accuracy, {result.views}, on the {held['images']} labelled images no run trained on:")
        for m, acc in zip(result.members, held["members"]):
            print(f"  {acc:.4f}  {m.path}{f' (out-of-fold, {len(m.runs)} folds)' if m.kind == 'cv' else ''}")
        if len(result.members) > 1:
            print(f"  {held['ensemble']:.4f}  ensemble ({args.ensemble})")
    elif held:
        print("no labelled image is held out from every run (e.g. folds of one cv): no held-out accuracy.")
    print(f"submission: {result.submission} ({result.rows} rows, {result.views}, {len(result.members)} run(s), "
          f"ensemble {args.ensemble})")
    return 0


@command
def cmd_check(args) -> int:
    from imgcls import api
    from imgcls.planning import duration

    result = api.check(args.data, config=args.config, out=args.out, tta=args.tta, tta_views=args.tta_views,
                       steps=args.steps, **({} if args.tta_weight is None else {"tta_weight": args.tta_weight}),
                       **overrides(args))
    print(f"check: every stage ran in {result.seconds:.1f}s:")
    for st in result.stages:
        print(f"  {st.name:<9}{st.seconds:6.1f}s  {st.detail}")
    e = result.estimate
    print(f"estimate for the real run on this machine ({e.device}), from a warm step:")
    print(f"  training {e.images_per_second:.0f} images/s at batch_size={e.batch_size}, {e.image_size} px; "
          f"evaluation {e.eval_images_per_second:.0f} images/s")
    print(f"  epoch ~{duration(e.epoch_seconds)} ({e.steps_per_epoch} steps + validation)")
    if e.run_seconds is not None:
        print(f"  whole run ~{duration(e.run_seconds)} ({e.epochs} epochs and the final predictions)")
    print(f"  peak memory {e.peak_memory / 1e9:.2f} GB at batch_size={e.batch_size} ({e.memory_source})")
    for note in e.notes:
        print(f"  note: {note}")
    print(f"submission: {result.submission_rows} rows checked (the real run writes all {result.test_images})"
          if result.test_images else "submission: none (the data has no test split)")
    if result.out:
        print(f"kept: {result.out} (run/ with its report.html, submission.csv)")
    return 0


@command
def cmd_cv(args) -> int:
    from imgcls import api

    out = Path(args.out)
    result = api.cv(args.data, out, folds=args.folds, fold=args.fold, refit=args.refit, submit=args.submit,
                    config=args.config, **overrides(args))
    if result.interrupted:
        return 130
    for f in result.failed:
        print(f"fold {f} did not finish; rerun it alone with:\n"
              f"  {command_line('cv', args.data, '--out', out, '--folds', result.folds, '--fold', f)}")
    if result.missing:
        print(f"fold(s) {', '.join(map(str, result.missing))} of {result.folds} are not finished; cv.json is "
              "written once all are.")
        return 1
    for p in result.per_fold:
        print(f"fold {p['fold']}: acc {p['acc']:.4f} on {p['val_images']} held-out images (best epoch {p['best_epoch']})")
    fa = result.fold_acc
    print(f"cv: fold acc {fa['mean']:.4f} +- {fa['std']:.4f} (mean +- sample std over {result.folds} folds), "
          f"out-of-fold acc {result.oof_acc:.4f} on {result.labelled_images} images")
    print(f"out-of-fold predictions: {result.oof}\nsummary: {result.summary}")
    if result.refit:
        o = result.refit["outcome"]
        print(f"refit: {o['status']} on every labelled image for {result.refit['epochs']} epoch(s) (the folds' mean "
              f"best epoch): {out / 'refit'}")
    if result.submission:
        source = ("the refit's" if result.submission_from == "refit" else
                  f"mean of the {result.folds} folds' probabilities")
        print(f"submission ({source}): {result.submission}")
    print_report(result.report, result.report_error)
    return 0


@command
def cmd_report(args) -> int:
    from imgcls import api

    print_report(api.write_report(args.run))
    return 0


@command
def cmd_demo(args) -> int:
    from imgcls import api

    t0 = time.time()
    result = api.demo(Path(args.out), **overrides(args))
    print(f"demo: best val_acc {result.best_val_acc:.4f} (chance 0.10) in {time.time() - t0:.0f}s")
    print(f"submission: {result.submission}\nrun: {result.run_dir}")
    return 0


@command
def cmd_models(args) -> int:
    from imgcls import api, hardware, recipes

    sizes = tuple(int(x) for x in args.sizes.split(","))
    found = api.models(sizes=sizes, speed=not args.no_speed, device=args.device, batch=args.batch)
    batches = ", ".join(f"{b} at {s} px" for s, b in found[0].train_batch.items())
    where = "" if args.no_speed else f" (training img/s: batch {batches}, {hardware.describe(args.device)})"
    print(f"{'model':12s} {'params':>8s} " + " ".join(f"{f'GFLOPs@{s}':>10s}" for s in sizes)
          + ("" if args.no_speed else " " + " ".join(f"{f'img/s@{s}':>10s}" for s in sizes)) + where)
    for p in found:
        speed = "" if args.no_speed else " " + " ".join(f"{p.train_images_per_second[s]:10.1f}" for s in sizes)
        print(f"{p.name:12s} {p.params / 1e6:7.2f}M " + " ".join(f"{p.gflops[s]:10.3f}" for s in sizes) + speed
              + f"  {p.summary}")
    print(f"model=auto: {recipes.model_for(64)} up to 64 px, {recipes.model_for(128)} above; any timm model as "
          "model=timm:<name>")
    return 0


@command
def cmd_tune(args) -> int:
    from imgcls import api, tuning

    if args.show_space:
        import yaml

        print(yaml.safe_dump(tuning.DEFAULT_SPACE, sort_keys=False), end="")
        return 0
    if args.status:
        found = api.tune_status(args.status)
        print(f"{args.status}: " + ", ".join(f"{n} {k}" for k, n in sorted(found["counts"].items())))
        if found["best"]:
            b = found["best"]
            print(f"best so far: trial {b['trial']}, final val_acc {b['value']:.4f} ({b['run']}): "
                  + " ".join(f"{k}={v}" for k, v in b["params"].items()))
        for r in found["running"]:
            print(f"running: trial {r['trial']} ({r['run']})")
        return 0
    if not args.data or not args.out:
        raise UserError("imgcls tune needs DATA and --out TUNE (or --status TUNE, or --show-space).")
    result = api.tune(args.data, args.out, trials=args.trials, time_limit=args.time_limit, space=args.space,
                      workers=args.workers, storage=args.storage, confirm=args.confirm, config=args.config,
                      **overrides(args))
    print("trials: " + ", ".join(f"{n} {k}" for k, n in sorted(result.trials.items())))
    if not result.best:
        print("no trial has finished: rerun the same command to continue the study")
        return 1
    b, c = result.best, result.confirmed
    print(f"best: trial {b['number']}, final val_acc {b['value']:.4f}: " + " ".join(f"{k}={v}" for k, v in b["params"].items()))
    print(f"its settings over {c['n']} seed(s): final val_acc {c['mean']:.4f} +- {c['std']:.4f} (mean +- sample std)")
    print(f"settings: {result.best_config} (imgcls train DATA --out RUN --config {result.best_config})")
    print(f"report: {result.report}" if result.report else f"warning: {result.report_error}")
    return 0


@command
def cmd_presets(args) -> int:
    from imgcls import presets

    for p in presets.listing():
        print(f"{p.name}\n  for: {p.purpose}\n  measured: {p.measured}")
    print(f"use one with --config NAME (e.g. imgcls train DATA --out RUN --config {presets.names()[0]}); "
          f"the files are in {presets.folder()}")
    return 0


@command
def cmd_preview(args) -> int:
    from imgcls import api

    shown = api.render_preview(args.data, args.out, views=args.views, images=args.images, config=args.config,
                               **overrides(args))
    print(f"grid: {shown.grid_path} ({len(shown.stems)} images x (eval view + {args.views} training views) at "
          f"{shown.size} px)")
    print(f"views: {Path(args.out) / 'views'}/<stem>_<k>.png, k = 0 the eval view, 1..{args.views} training views")
    for stem, n in zip(shown.stems, shown.distinct):
        print(f"  {stem}: {n} distinct training views of {args.views}")
    print(f"fewest distinct training views of one image: {min(shown.distinct)} of {args.views}")
    if shown.mixed:
        print("mixup/cutmix are on: training views blend in other rows' images, as in training")
    return 0


class HelpConfig(argparse.Action):  # every key with its default, then exit (like --help)
    def __call__(self, parser, namespace, values, option_string=None):
        from imgcls import config
        print(config.describe())
        parser.exit()


def count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more; got {text}")
    return int(text)


def settings_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", help="a preset's name (imgcls presets) or a YAML file of settings")
    sp.add_argument("--help-config", nargs=0, action=HelpConfig, help="list every key=value setting and its default")
    sp.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. epochs=30 lr=0.1")


def tta_args(sp: argparse.ArgumentParser, *, check: bool = False) -> None:
    sp.add_argument("--tta", type=count, default=0, metavar="N", help="the --tta you will give imgcls predict" if check
                    else "test-time views besides the plain one; 0 = plain")
    sp.add_argument("--tta-weight", type=float, default=None, metavar="W",
                    help="weight of the plain view: W * p(plain) + (1 - W) * mean over the N views (default 0.5)")
    sp.add_argument("--tta-views", default="fixed", choices=["fixed", "aug"],
                    help="fixed: flips and shifted crops (default, deterministic); aug: the run's training augmentation")


def args_train(sp):
    sp.add_argument("data")
    sp.add_argument("--out", required=True, help="run directory")
    settings_args(sp)


def args_check(sp):
    sp.add_argument("data")
    sp.add_argument("--out", default=None, help="keep what the check wrote here (default: a temporary folder)")
    sp.add_argument("--steps", type=int, default=1, metavar="N", help="training steps per check epoch (default 1)")
    tta_args(sp, check=True)
    settings_args(sp)


def args_predict(sp):
    sp.add_argument("runs", nargs="+", metavar="RUN")
    sp.add_argument("--data", required=True)
    sp.add_argument("--out", required=True, help="submission CSV to write")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    tta_args(sp)
    sp.add_argument("--ensemble", default="mean", choices=["mean", "logits", "vote"],
                    help="combine runs: mean of probabilities, mean of logits, or majority vote (ties: summed probability)")
    sp.add_argument("--weights", metavar="W1,W2,...|oof", help="one weight per run (default equal), or oof: fitted "
                    "by log loss on the runs' shared held-out / out-of-fold predictions")


def args_cv(sp):
    sp.add_argument("data")
    sp.add_argument("--out", required=True, help="cv directory (DIR/fold-k/ are run directories)")
    sp.add_argument("--folds", type=int, default=None, metavar="K", help="number of folds (default 5, or the saved K)")
    sp.add_argument("--fold", type=int, action="append", metavar="k",
                    help="train only this fold (repeatable); finished folds are always skipped")
    sp.add_argument("--refit", action="store_true", help="then train once on every labelled image (holdout=none) "
                    "for the folds' mean best epoch count, into DIR/refit/")
    sp.add_argument("--submit", choices=["folds", "refit"], help="DIR/submission.csv from the folds' mean or the refit "
                    "(default: the refit with --refit)")
    settings_args(sp)


def args_preview(sp):
    sp.add_argument("data")
    sp.add_argument("--out", required=True, help="directory for grid.png and views/")
    sp.add_argument("--views", type=int, default=8, metavar="N", help="training views per image (default 8)")
    sp.add_argument("--images", type=int, default=8, metavar="N",
                    help="training images, one per class in turn (default 8)")
    settings_args(sp)


def args_models(sp):
    sp.add_argument("--sizes", default="64,128", help="input sizes in px (default 64,128)")
    sp.add_argument("--no-speed", action="store_true", help="skip the speed measurement (a few seconds per model)")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--batch", type=int, default=None,
                    help="batch size of the timed training steps (default: the batch a run trains with at each size, "
                         "printed in the header)")


def args_inspect(sp):
    sp.add_argument("data")
    settings_args(sp)


def args_report(sp):
    sp.add_argument("run", metavar="RUN", help="a run directory (imgcls train --out) or a cv directory (imgcls cv --out)")


def args_tune(sp):
    sp.add_argument("data", nargs="?")
    sp.add_argument("--out", help="the study's folder (TUNE/trial-<n>/ are run folders)")
    sp.add_argument("--trials", type=count, default=0, metavar="N", help="finished trials to reach (default 20 "
                    "without --time-limit)")
    sp.add_argument("--time-limit", default="", metavar="T", help="e.g. 2h: no new trial after it, the confirmation "
                    "runs included")
    sp.add_argument("--space", metavar="FILE.yaml", help="the search space (default: --show-space prints it)")
    sp.add_argument("--workers", type=count, default=0, metavar="N", help="processes sharing the study (default: one "
                    "per GPU, else 1)")
    sp.add_argument("--storage", default="", metavar="URL", help="a database (postgresql://...) that several "
                    "machines share; default the journal file TUNE/study.log")
    sp.add_argument("--confirm", type=count, default=2, metavar="N", help="other seeds to train the best with")
    sp.add_argument("--status", metavar="TUNE", help="print where the study in TUNE stands, and exit")
    sp.add_argument("--show-space", action="store_true", help="print the default search space, and exit")
    settings_args(sp)


def args_demo(sp):
    sp.add_argument("--out", required=True)
    sp.add_argument("overrides", nargs="*", metavar="key=value")


# command -> (help, the function that adds its arguments), in the order `imgcls --help` lists them
SUBCOMMANDS = {
    "inspect": ("detect the layout, count images, list unreadable files", args_inspect),
    "train": ("train a model and write the run directory and submission", args_train),
    "check": ("every stage of a run with these settings on a few images, in seconds, and what the real run would "
              "cost on this machine", args_check),
    "predict": ("write a submission from one or more trained runs", args_predict),
    "cv": ("k-fold cross validation over train+val: one run per fold, out-of-fold predictions, fold-ensemble "
           "submission", args_cv),
    "preview": ("write the eval view and N training views of a few images, and a grid", args_preview),
    "models": ("the built-in models: parameters, FLOPs, and training images/s measured here", args_models),
    "report": ("plots (curves, confusion matrix, per-class accuracy, mistakes) and one self-contained report.html "
               "for a run or cv directory", args_report),
    "demo": ("train on a small dataset bundled with scikit-learn; no data needed", args_demo),
    "presets": ("the settings presets shipped with imgcls (--config NAME): what each is for and its measured figure",
                lambda sp: None),
    "tune": ("search the recipe on your data (Optuna: TPE + pruning), resumable, one worker per GPU; best.yaml",
             args_tune),
}


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(prog="imgcls", description="Train image classifiers from scratch and write "
                                "correct competition submissions.")
    p.add_argument("--version", action="version", version=f"imgcls {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add_args) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=text))
    return p, sub.choices


def main(argv: list[str] | None = None) -> int:
    """The `imgcls` command: returns its exit code, except in a torchrun rank, which it ends with that code."""
    code = _command(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # A torchrun rank ends here, skipping the interpreter's teardown: gloo can abort in it ("terminate called
        # without an active exception", after destroy_process_group; 1 in 40 two-rank CPU trainings here), and
        # torchrun would report the finished run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _command(argv: list[str] | None) -> int:
    top, commands = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in commands:
        top.parse_args(argv)  # --help, --version, or a usage error (exit 2)
    # Intermixed: `train DATA --out RUN epochs=3` and `train DATA epochs=3 --out RUN` both work.
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    from imgcls.process import keep_freed_memory  # torch-free: `imgcls inspect` does not import torch

    keep_freed_memory()  # this process is ours: reuse freed memory, no page faults per step
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"imgcls {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `imgcls presets | head`: the reader has gone; nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
