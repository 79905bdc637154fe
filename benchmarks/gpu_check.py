"""Every CUDA path of imgcls in one run, with what it measures (issue 17): run this first on a GPU.

    python benchmarks/gpu_check.py [--data /work/data/tiny-imagenet-100] [--models resnet18d resnet18s]
        [--sizes 64 128] [--epochs 4] [--paths TEXT ...] [--out DIR]
    python benchmarks/gpu_check.py --device cpu --quick      # CI: tiny model and data, under a minute

Prints a header (date, commit, device, torch), then per model and size (the tiny-imagenet preset
with epochs=--epochs, the cache at that size):
  - train img/s end to end: trainer.train_step (cache rows -> augmentation on the device -> step)
    over whole epochs, clock read after torch.cuda.synchronize(); median of the epochs after the
    first (which pays cudnn's autotuning), or the only one;
  - step img/s: trainer.model_step alone on synthetic tensors already on the device (same batch,
    precision, memory format, optimizer); median of 3 timings. ratio = train / step: how much of
    the model's speed the data path keeps (goal >= 95%);
  - peak GPU memory (torch.cuda.max_memory_allocated, the image cache included) and val_acc after
    the recipe.
Then one line per path: the cache on the GPU and streamed from pinned memory (data_on_device=),
each amp mode the GPU runs (bf16 from compute capability 8.0, fp16 with its GradScaler, off),
channels_last=false, compile=true, imgcls.train, a 2-fold imgcls.cv, imgcls.predict with TTA,
`torchrun --nproc_per_node 1 -m imgcls train`, and a 1-process NCCL group running DDP +
SyncBatchNorm + fp16 GradScaler + imgcls's no_sync accumulation. A path that fails prints FAIL with
its error and the script goes on; the exit status is 1 if any failed.

Sized for a datacenter GPU (A100/H100 class) to finish in under 8 minutes on tiny-imagenet-100; a
T4 is several times slower (use --epochs 2 --sizes 64 there). Nothing is written outside --out
(default: a temporary folder); --keep leaves it.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's imgcls, also when run as a plain script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import imgcls  # noqa: E402
from imgcls import augment, config, data as datalib, distributed, hardware, layouts, trainer, training  # noqa: E402

TINY_CONFIG = "tiny-imagenet"  # the preset shipped in the package
QUICK = {"models": ["tinycnn:8"], "sizes": [16, 32], "epochs": 2, "synthetic_steps": 4,  # 5 steps per epoch
         "overrides": {"batch_size": 32, "eval_batch_size": 64, "ema": 0.0, "decode_workers": 1}}


# --- what the numbers are measured on ----------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the GPU runs ahead of Python: wait before reading the clock


def commit() -> str:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()
        except OSError:  # no git on the machine (a device image): the commit comes from $COMMIT
            return ""
    head = git("rev-parse", "--short", "HEAD") or os.environ.get("COMMIT", "?")
    return head + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def header(device: torch.device) -> list[str]:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        where = (f"{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2 ** 30:.1f} GiB, "
                 f"{torch.cuda.device_count()} GPU(s) visible; CUDA {torch.version.cuda}, cuDNN "
                 f"{torch.backends.cudnn.version()}, kernels for {' '.join(torch.cuda.get_arch_list())}")
    else:
        where = f"{hardware.device_name(device)}, capability {torch.backends.cpu.get_cpu_capability()}"
    hw = hardware.resolve(config.RunConfig(device=device.type))
    return [f"imgcls gpu_check  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  commit {commit()}  imgcls {imgcls.__version__}",
            f"device: {where}",
            f"torch {torch.__version__}, Python {platform.python_version()}; amp=auto -> {hardware.amp_name(hw.amp)}, "
            f"channels_last=auto -> {str(hw.channels_last).lower()}"]


def subset(root: Path, out: Path, *, classes: int = 10, per_class: int = 20, test: int = 20) -> Path:
    """A tiny-imagenet folder of `classes` x `per_class` training images and `test` test images, as
    symbolic links to `root`'s files, with a matching template."""
    wnids = (root / "wnids.txt").read_text().split()[:classes]
    (out / "test" / "images").mkdir(parents=True)
    (out / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    for w in wnids:
        (out / "train" / w / "images").mkdir(parents=True)
        for p in sorted((root / "train" / w / "images").iterdir())[:per_class]:
            (out / "train" / w / "images" / p.name).symlink_to(p)
    names = sorted(p.name for p in (root / "test" / "images").iterdir())[:test]
    for name in names:
        (out / "test" / "images" / name).symlink_to(root / "test" / "images" / name)
    (out / "submission_sample.csv").write_text("image_id,label\n" + "".join(f"{n},0\n" for n in names))
    return out


def dataset(args, work: Path) -> Path:
    data = Path(args.data)
    if not args.quick:
        if not data.is_dir():
            raise SystemExit(f"--data {data} is not a folder: give the tiny-imagenet-100 folder (or any dataset imgcls reads)")
        return data
    if data.is_dir() and layouts.detect(data) == "tiny-imagenet":
        return subset(data, work / "data")
    from imgcls.digits import write_digits  # the data is absent (CI): scikit-learn's bundled digits

    return shrink_food11(write_digits(work / "data"), train=16, val=4, test=20)


def shrink_food11(root: Path, *, train: int, val: int, test: int) -> Path:
    """Keep the first `train` / `val` images of each class in training/ / validation/ and `test` test images."""
    for folder, keep in (("training", train), ("validation", val)):
        for p in (root / folder).iterdir():
            if int(p.stem.split("_")[1]) >= keep:
                p.unlink()
    for p in sorted((root / "test").iterdir())[test:]:
        p.unlink()
    return root


# --- training figures --------------------------------------------------------------------------

class Bench:
    """The settings every run here shares (recipe file, quick overrides, cache folder) and the runs."""

    def __init__(self, args, data: Path, work: Path):
        self.args, self.data, self.work = args, data, work
        self.quick = QUICK if args.quick else None
        self.config = TINY_CONFIG if layouts.detect(data) == "tiny-imagenet" else None
        self.base = {"device": args.device, "progress": False, "cache_dir": str(work / "cache"),
                     "epochs": args.epochs, **(self.quick["overrides"] if self.quick else {})}
        self.preps: dict[tuple, datalib.Prepared] = {}  # one layout read and cache check per cache size

    def cfg(self, **overrides):
        return config.for_data(self.data, self.config, {**self.base, **overrides}).cfg

    def train(self, *, synthetic: bool = False, **overrides) -> dict:
        """Train with the recipe (+ overrides) through the training loop's own pieces, timing each epoch honestly."""
        started = time.perf_counter()
        cfg = self.cfg(**overrides)
        key = (config.cache_size(cfg.data), cfg.data.resize, cfg.data.val_fraction, cfg.run.seed)
        prep = self.preps.get(key) or self.preps.setdefault(key, datalib.prepare(self.data, cfg, progress=False))
        hw = hardware.resolve(cfg.run)
        if hw.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(hw.device)
        images = hardware.place_cache(prep.images, hw, cfg.run.data_on_device)
        settled = training.Settled(cfg, training.schedule_of(cfg, len(prep.rows["train"])))
        loop = training.new_loop(settled, prep, prep.rows, images, hw, distributed.Ranks())
        state, rates, m = loop.state, [], {}
        while state.epoch < loop.schedule.epochs:
            sync(hw.device)
            t0 = time.perf_counter()
            for rows in trainer.epoch_batches(state, loop.train_rows, loop.schedule, cfg):
                trainer.train_step(state, loop.batch, rows, schedule=loop.schedule, cfg=cfg, timer=loop.timer)
            training.check_finite(loop)
            sync(hw.device)
            rates.append(state.sums["seen"] / (time.perf_counter() - t0))
            m, _ = training.end_epoch(loop)
        out = {"train": statistics.median(rates[1:] or rates), "epochs": len(rates), "val_acc": m["val_acc"],
               "skipped": m.get("skipped_steps"), "hw": hw, "batch": cfg.run.batch_size,
               "cache_on": images.device.type, "pinned": hw.device.type == "cuda" and images.device.type == "cpu"
               and images.is_pinned()}
        if synthetic:
            out["step"] = model_step_rate(loop, steps=self.quick["synthetic_steps"] if self.quick else 20)
        out["peak"], out["seconds"] = peak_memory(hw.device), time.perf_counter() - started
        del loop, state
        return out


def model_step_rate(loop: training.Loop, *, steps: int, repeats: int = 3) -> float:
    """img/s of trainer.model_step alone on one synthetic batch already on the device."""
    hw, b, size, cfg = loop.hw, loop.schedule.batch_size, loop.schedule.size(loop.schedule.epochs - 1), loop.cfg
    g = torch.Generator(device=hw.device).manual_seed(0)
    x = torch.randn(b, 3, size, size, device=hw.device, generator=g).contiguous(memory_format=hw.memory_format)
    labels = torch.randint(0, loop.batch.num_classes, (b,), device=hw.device, generator=g)
    targets = augment.one_hot(labels, loop.batch.num_classes, cfg.optim.label_smoothing)
    loop.state.model.train()
    for _ in range(3):  # warm-up: cudnn autotuning, allocator
        trainer.model_step(loop.state, x, targets, cfg)
    rates = []
    for _ in range(repeats):
        sync(hw.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.model_step(loop.state, x, targets, cfg)
        sync(hw.device)
        rates.append(b * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    return f"RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process peak)"  # Linux: KiB


def model_table(bench: Bench, models: list[str], sizes: list[int]) -> None:
    lines = [f"recipe: {bench.config if bench.config else 'defaults'} with epochs={bench.args.epochs}"
             f"{' ' + ' '.join(f'{k}={v}' for k, v in bench.quick['overrides'].items()) if bench.quick else ''}, "
             "amp/channels_last/data_on_device auto",
             f"{'model':14s} {'px':>4s} {'batch':>5s} {'train img/s':>12s} {'step img/s':>11s} {'ratio':>7s}  "
             f"{'peak memory':<34s} {'val_acc':>7s} {'wall':>6s}"]
    print("\n".join(lines), flush=True)
    for size in sizes:
        for spec in models:
            name, _, width = spec.partition(":")
            r = bench.train(synthetic=True, model=name, width=int(width or 0), image_size=size)
            print(f"{spec:14s} {size:4d} {r['batch']:5d} {r['train']:12.0f} {r['step']:11.0f} "
                  f"{r['train'] / r['step']:7.1%}  {r['peak']:<34s} {r['val_acc']:7.4f} {r['seconds']:5.0f}s", flush=True)


# --- the paths ---------------------------------------------------------------------------------

def path_checks(bench: Bench, device: torch.device) -> list[tuple[str, object]]:
    """(name, fn returning a line, or a string: skipped and why), in the order they run."""
    name, _, width = bench.args.models[0].partition(":")
    small = {"model": name, "width": int(width or 0), "image_size": bench.args.sizes[0], "epochs": min(2, bench.args.epochs)}
    cuda = device.type == "cuda"
    auto = hardware.auto_amp(hardware.gpu_of(device))

    def run(**overrides):
        def check():
            r = bench.train(**{**small, **overrides})
            where = f"cache on {r['cache_on']}{', pinned' if r['pinned'] else ''}"
            extra = f", skipped_steps {r['skipped']}" if r["skipped"] is not None else ""
            epochs = f"epochs 2-{r['epochs']}" if r["epochs"] > 1 else "1 epoch, with warm-up"
            return (f"{r['train']:.0f} img/s ({epochs}), amp {hardware.amp_name(r['hw'].amp)}, "
                    f"channels_last {str(r['hw'].channels_last).lower()}, {where}, peak {r['peak']}, "
                    f"val_acc {r['val_acc']:.4f}{extra}, {r['seconds']:.0f}s")
        return check

    # fp32 always; fp16 (+ GradScaler) on the CPU and on a GPU that amp=auto runs in reduced precision;
    # bf16 where amp=auto picks it
    amps = ["off", "fp16" if not cuda or auto is not None else None, "bf16" if auto == torch.bfloat16 else None]
    checks = [("data_on_device=true", run(data_on_device="true") if cuda else "the CPU has no device memory"),
              ("data_on_device=false", run(data_on_device="false") if cuda else "the CPU has no device memory")]
    checks += [(f"amp={a}", run(amp=a)) for a in amps if a]
    checks += [("channels_last=false", run(channels_last="false")),
               ("compile=true", run(compile="true") if cuda and not bench.quick else
                "--quick on the CPU: inductor's C++ build alone takes longer than this whole check"),
               ("imgcls.train + imgcls.predict --tta 4", lambda: api_train_predict(bench, small)),
               ("imgcls.cv --folds 2", lambda: api_cv(bench, small)),
               ("torchrun --nproc_per_node 1 -m imgcls train", lambda: torchrun_train(bench, small)),
               (f"torchrun, 1 process: {'NCCL' if cuda else 'gloo'} + DDP + fp16 GradScaler",
                lambda: torchrun_smoke(bench.args.device))]
    return checks


def api_train_predict(bench: Bench, small: dict) -> str:
    t0 = time.perf_counter()
    result = imgcls.train(bench.data, bench.work / "api-run", config=bench.config, verbose=False,
                          **{**bench.base, **small, "epochs": 1})
    t1 = time.perf_counter()
    predicted = imgcls.predict([result.run_dir], bench.data, bench.work / "tta.csv", tta=4,
                               device=bench.args.device, progress=False)
    held = predicted.heldout or {}
    return (f"train {t1 - t0:.1f}s (val_acc {result.best_val_acc:.4f}, submission {result.submission.name}); "
            f"predict {time.perf_counter() - t1:.1f}s, {predicted.rows} rows, {predicted.views}, held-out acc "
            f"{held.get('ensemble', float('nan')):.4f}")


def api_cv(bench: Bench, small: dict) -> str:
    t0 = time.perf_counter()
    result = imgcls.cv(bench.data, bench.work / "cv", folds=2, config=bench.config, verbose=False,
                       **{**bench.base, **small, "epochs": 1})
    if result.failed or result.fold_acc is None:
        raise RuntimeError(f"folds {result.failed} failed: see {result.out}/fold-*/error.txt")
    return (f"{time.perf_counter() - t0:.1f}s, fold acc {result.fold_acc['mean']:.4f} +- {result.fold_acc['std']:.4f}, "
            f"oof acc {result.oof_acc:.4f}, {result.labelled_images} labelled images")


def torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-1500:]}")
    return proc


def torchrun_train(bench: Bench, small: dict) -> str:
    settings = {**bench.base, **small, "epochs": 1}
    t0 = time.perf_counter()
    proc = torchrun(["-m", "imgcls", "train", str(bench.data), "--out", str(bench.work / "torchrun"),
                     *([f"--config={bench.config}"] if bench.config else []), *(f"{k}={v}" for k, v in settings.items())])
    best = next((line for line in proc.stdout.splitlines() if line.startswith("best val_acc")), "?")
    return f"{time.perf_counter() - t0:.1f}s with start-up: {best}"


def torchrun_smoke(device: str) -> str:
    t0 = time.perf_counter()
    proc = torchrun([__file__, "--ddp-smoke", "--device", device])
    return f"{time.perf_counter() - t0:.1f}s with start-up: {proc.stdout.strip().splitlines()[-1]}"


def ddp_smoke(device_setting: str) -> None:
    """In a torchrun process: a process group (NCCL on a GPU), DDP over a BatchNorm model (SyncBatchNorm
    on a GPU), fp16 autocast + the GradScaler imgcls makes, 2 micro-batches per step with imgcls's
    no_sync, and an all-reduce."""
    import torch.distributed as dist
    import torch.nn as nn

    from imgcls.models import create_model

    hw = hardware.resolve(config.RunConfig(device=device_setting, amp="fp16"))
    cuda = hw.device.type == "cuda"
    if cuda:
        torch.cuda.set_device(hw.device)
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": hw.device} if cuda else {}))
    torch.manual_seed(0)
    model = create_model("resnet9", 10, width=16).to(hw.device, memory_format=hw.memory_format)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if cuda else model
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[hw.device.index] if cuda else None)
    optimizer, scaler = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), hw.grad_scaler()
    for _ in range(3):
        x = torch.randn(16, 3, 32, 32, device=hw.device).contiguous(memory_format=hw.memory_format)
        y = torch.randint(0, 10, (16,), device=hw.device)
        for k, (xs, ys) in enumerate(zip(x.chunk(2), y.chunk(2))):
            with distributed.no_sync(ddp, skip=k == 0):  # the all-reduce on the last micro-batch only
                with hw.autocast():
                    logits = ddp(xs)
                scaler.scale(F.cross_entropy(logits.float(), ys) / 2).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    t = torch.full((1,), float(dist.get_rank() + 1), device=hw.device)
    dist.all_reduce(t)
    print(f"backend {dist.get_backend()}, world {dist.get_world_size()}, all_reduce {t.item():g}, "
          f"{len(list(p for p in model.modules() if isinstance(p, nn.SyncBatchNorm)))} SyncBatchNorm layers, "
          f"loss scale {scaler.get_scale():g} after 3 steps, loss {F.cross_entropy(logits.float(), ys).item():.3f}")
    dist.destroy_process_group()


# --- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/work/data/tiny-imagenet-100")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny model, sizes and data (CI)")
    p.add_argument("--models", nargs="+", help="registered names, optionally name:width (default resnet18d, the recipe's model, and resnet18s)")
    p.add_argument("--sizes", nargs="+", type=int, help="px (default 64 128)")
    p.add_argument("--epochs", type=int, help="epochs of the recipe (default 4)")
    p.add_argument("--out", help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--paths", nargs="+", metavar="TEXT", help="run only the paths whose names contain one of these "
                   "(e.g. a rerun of the ones that failed: --paths amp=fp16 torchrun); the rest print as skipped")
    p.add_argument("--ddp-smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_smoke:
        ddp_smoke(args.device)
        return 0
    defaults = QUICK if args.quick else {"models": ["resnet18d", "resnet18s"], "sizes": [64, 128], "epochs": 4}
    args.models, args.sizes = args.models or defaults["models"], args.sizes or defaults["sizes"]
    args.epochs = args.epochs or defaults["epochs"]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible here; --device cpu --quick runs the CPU check")
    device = hardware.resolve(config.RunConfig(device=args.device)).device  # refuses a GPU this torch cannot run
    work = Path(args.out or tempfile.mkdtemp(prefix="imgcls-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        for line in header(device):
            print(line)
        data = dataset(args, work)
        print(f"data: {data} ({layouts.read(data).describe().split(': ', 1)[1]})\n", flush=True)
        bench = Bench(args, data, work)
        model_table(bench, args.models, args.sizes)
        failed = run_paths(bench, device)
    finally:
        if not (args.keep or args.out):
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'FAILED' if failed else 'all ok'}: {failed} path(s) failed; {time.perf_counter() - t0:.0f}s in all")
    return 1 if failed else 0


def run_paths(bench: Bench, device: torch.device) -> int:
    print("\npaths:", flush=True)
    failed = 0
    for name, check in path_checks(bench, device):
        if bench.args.paths and not any(text in name for text in bench.args.paths):
            check = f"not in --paths {' '.join(bench.args.paths)}"
        if isinstance(check, str):
            print(f"  skip  {name}: {check}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            line = check()
            print(f"  ok    {name}: {line}", flush=True)
        except Exception as e:  # noqa: BLE001 - one broken path must not hide the others
            failed += 1
            print(f"  FAIL  {name} after {time.perf_counter() - t0:.1f}s: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)
    return failed


if __name__ == "__main__":
    sys.exit(main())
