"""The training loop. `fit()` trains one model into a run directory and returns a TrainResult;
it prints nothing itself (the CLI passes `on_epoch` to show progress)."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

import imgcls
from imgcls import augment, checkpoint, config, distributed, hardware, predict, report, submission
from imgcls.config import Config, OptimConfig
from imgcls.data import Prepared
from imgcls.errors import UserError
from imgcls.losses import loss_fn
from imgcls.models import create_model


@dataclass
class TrainResult:
    run_dir: Path
    best_val_acc: float
    final_val_acc: float
    best_epoch: int
    epochs_done: int
    stopped: str  # done | time_limit | interrupted
    metrics: list[dict] = field(default_factory=list)
    submission: Path | None = None


def lr_at(step: int, *, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor` at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_lr(cfg: OptimConfig, batch_size: int) -> float:
    """`lr` is given per 512 images of global batch and scaled linearly (Goyal et al. 2017),
    so one config trains the same on any batch size and number of ranks."""
    return cfg.lr * batch_size / 512


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]  # no weight decay on norms and biases
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers = {
        "sgd": lambda: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov),
        "adamw": lambda: torch.optim.AdamW(groups, lr=cfg.lr),
    }
    return optimizers[cfg.optimizer]()


def ema_update(decay: float):
    """AveragedModel's multi_avg_fn for an EMA whose decay warms up as min(decay, (1 + n) / (10 + n))
    over its n updates (TensorFlow's ExponentialMovingAverage with num_updates). torch's
    get_ema_multi_avg_fn uses `decay` from the first step: a 69-step food-10 run with ema=0.999
    then evaluated weights still 93% random (val_acc 0.100 = chance at every epoch)."""
    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor) -> None:
        if not ema_params[0].is_floating_point():  # integer buffers (BatchNorm's num_batches_tracked)
            torch._foreach_copy_(ema_params, params)
            return
        keep = torch.clamp((1 + n) / (10 + n), max=decay)  # a tensor: no CPU-GPU sync per step
        torch._foreach_lerp_(ema_params, params, (1 - keep).to(ema_params[0].dtype))
    return update


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def place_images(prep: Prepared, hw: hardware.Hardware, setting: str) -> torch.Tensor:
    """The whole cache as a tensor: on the GPU when it fits (airbench-style), else in pinned RAM."""
    images = torch.from_numpy(np.array(prep.images))  # one read of the memory-mapped file into RAM
    if hw.device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(hw.device)
    fits = images.numel() < 0.4 * free  # leave most of the memory to the model and activations
    if setting == "true" or (setting == "auto" and fits):
        return images.to(hw.device)
    return images.pin_memory()


def manifest(cfg: Config, prep: Prepared, rows: dict[str, np.ndarray], hw: hardware.Hardware) -> dict:
    init = cfg.model.init
    return {
        "imgcls": imgcls.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(hw.device) if hw.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "seed": cfg.run.seed,
        "data": {"root": str(prep.dataset.root.resolve()), "layout": prep.dataset.layout,
                 "fingerprint": prep.fingerprint, "images": {k: int(len(v)) for k, v in rows.items()},
                 "skipped": len(prep.skipped), "skipped_files": prep.skipped},
        "classes": prep.classes,
        "pretrained": {"path": str(Path(init).resolve()), "sha256": checkpoint.sha256(Path(init))} if init else False,
        "external_data": False,  # only files under data.root were read
    }


def _floats(partial: dict) -> dict:
    """Epoch accumulators (device tensors while training) as plain numbers, for a checkpoint. Exact:
    a float32 sum becomes the same float64, and adding the next float32 tensor gives the same bits."""
    return {k: v.item() if torch.is_tensor(v) else v for k, v in partial.items()}


def check_finite(partial: dict, epoch: int, step: int) -> float:
    """Mean training loss so far this epoch; a NaN/inf stops the run before it reaches a checkpoint."""
    mean_loss = float(partial["loss"]) / max(1, partial["seen"])  # .item(): a CPU-GPU sync point
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"loss is {mean_loss} in epoch {epoch + 1} by step {step + 1}")
    return mean_loss


def sum_counts(partial: dict, ranks: distributed.Ranks) -> dict:
    """Epoch accumulators summed over ranks (loss, correct, seen); the timings stay this rank's.
    One process: `partial` itself."""
    if not ranks.active:
        return partial
    loss, correct, seen = ranks.sum([partial["loss"], partial["correct"], partial["seen"]])
    return {**_floats(partial), "loss": loss, "correct": int(correct), "seen": int(seen)}


def rank_rngs(state: dict, ranks: distributed.Ranks) -> dict | None:
    """This rank's saved generator states (augmentation, dropout). A resume on as many ranks as the saved
    run continues every rank's streams exactly; on a different number, rank 0 continues the saved
    rank 0's streams and a rank the saved run did not have gets None (the caller reseeds it)."""
    saved = state.get("rank_rngs") or [{k: state[k] for k in ("aug_gen", "torch_rng", "cuda_rng") if k in state}]
    if len(saved) == ranks.world or ranks.rank == 0:
        return saved[ranks.rank]
    return None


def val_score(model: nn.Module, images: torch.Tensor, rows: np.ndarray, labels: np.ndarray, *, size: int,
              hw: hardware.Hardware, batch_size: int, ranks: distributed.Ranks) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the validation rows. Over several ranks each scores every
    world-th row with rank 0's weights and the sums are reduced, so all ranks get the same numbers."""
    if not ranks.active:
        return predict.evaluate(model, images, rows, labels, size=size, hw=hw, batch_size=batch_size)[:2]
    distributed.sync_state(model, ranks)
    mine = rows[ranks.rank::ranks.world]
    loss, acc = (predict.evaluate(model, images, mine, labels, size=size, hw=hw, batch_size=batch_size)[:2]
                 if len(mine) else (0.0, 0.0))
    loss_sum, correct, n = ranks.sum([loss * len(mine), acc * len(mine), len(mine)])
    return loss_sum / n, correct / n


def stop_reserve(*, eval_seconds: float, step_seconds: float, n_val: int, n_test: int, limit: float) -> float:
    """Seconds to keep in hand under time_limit= when deciding whether to take another step: that
    step, the epoch-end evaluation that may follow it, finish() (validation + test inference with
    the best weights), and 10% of the limit, at most a minute, for loading weights, writing files
    and a slow disk (finish() on a 5-image test split took 0.4 s more than its inference here)."""
    per_image = eval_seconds / max(1, n_val)
    return step_seconds + eval_seconds + per_image * (n_val + n_test) + min(60.0, 0.1 * limit)


def resume_source(cfg: Config, out: str | Path) -> Path | None:
    """The run directory to continue from: --out itself when it holds a state.pt (the newest progress
    of this run), else resume=RUN; None for a fresh run."""
    if (Path(out) / "state.pt").is_file():
        return Path(out)
    if not cfg.run.resume:
        return None
    source = Path(cfg.run.resume).expanduser()
    source = source.parent if source.is_file() else source
    if not (source / "state.pt").is_file():
        raise UserError(f"resume={cfg.run.resume}: there is no state.pt in {source}. Give the --out folder of an "
                        "earlier `imgcls train` run (it writes state.pt at every epoch end).")
    return source


@contextlib.contextmanager
def stop_on_signal(signals=(signal.SIGINT, signal.SIGTERM)):
    """Ctrl-C (SIGINT) or SIGTERM (sent by `docker stop`, Slurm, a notebook's interrupt is SIGINT)
    asks the loop to stop at the next step boundary, where model, optimizer, generators and counters
    agree, so the state saved there resumes exactly. A second signal acts at once (the last checkpoint
    is kept). Yields the list of signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        received.append(signum)
        for s, h in previous.items():
            signal.signal(s, h)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate memory" in text


@contextlib.contextmanager
def user_errors(cfg: Config, out: Path):
    """Divergence, out-of-memory and a full disk as a UserError that names the setting to change."""
    kept = f"The last checkpoint in {out} is kept: rerun with the same --out (and the changed setting) to resume."
    try:
        yield
    except FloatingPointError as e:
        raise UserError(f"Training diverged: {e}. Lower lr=, set grad_clip=1.0, or amp=off. {kept}") from None
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        b = cfg.run.batch_size
        raise UserError(f"Out of memory ({(str(e).splitlines() or [type(e).__name__])[0][:160]}). Lower "
                        f"batch_size= (e.g. batch_size={max(1, b // 2)}; lr= is per 512 images, so it follows), or "
                        f"keep it and set accum_steps=2; if it ran out while evaluating, lower eval_batch_size= "
                        f"(now {cfg.run.eval_batch_size}); on a GPU, data_on_device=false frees the memory the image "
                        f"cache holds. A smaller image_size= or model= also helps. {kept}") from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(f"The disk is full while writing the run to {out}. Free space there or choose another "
                        f"--out. {kept}") from None


def fit(cfg: Config, prep: Prepared, out: str | Path, *, rows: dict[str, np.ndarray] | None = None,
        on_epoch: Callable[[dict], None] | None = None, started: float | None = None,
        ranks: distributed.Ranks | None = None) -> TrainResult:
    """Train into `out`, continuing from its state.pt (or resume=RUN's) when there is one.
    `started`: wall time (time.time()) that time_limit= counts from; default now.
    `ranks`: this process's place in a torchrun data-parallel run (distributed.init); default one process."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = rows or prep.rows
    ranks = ranks or distributed.Ranks()
    hw = hardware.resolve(cfg.run)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    num_classes, size, batch_size = prep.dataset.num_classes, cfg.data.image_size, cfg.run.batch_size
    distributed.check_batch(batch_size, ranks.world, cfg.optim.accum_steps)

    model = create_model(cfg.model.model, num_classes, width=cfg.model.width, dropout=cfg.model.dropout)
    if cfg.model.init:
        checkpoint.load_weights(model, Path(cfg.model.init))
    model.to(hw.device, memory_format=hw.memory_format)
    ddp = distributed.wrap(model, ranks, hw.device, sync_bn=cfg.run.sync_bn)  # `model` itself on one process
    model = checkpoint.unwrap(ddp)  # the plain module (with SyncBatchNorm layers under sync_bn=true)
    if ranks.rank:  # dropout: a stream of its own on each rank but 0 (which draws what one process draws)
        torch.manual_seed(distributed.rank_seed(cfg.run.seed, ranks.rank))
    optimizer = build_optimizer(model, cfg.optim)
    ema = None
    if cfg.optim.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=ema_update(cfg.optim.ema), use_buffers=True)
    eval_model = ema.module if ema else model
    step_model = torch.compile(ddp) if cfg.run.compile else ddp

    train_rows = torch.as_tensor(rows["train"])
    steps_per_epoch = max(1, len(train_rows) // batch_size)  # drop the last partial batch
    if len(train_rows) < batch_size:
        raise UserError(f"batch_size={batch_size} is larger than the {len(train_rows)} training images; "
                        f"set batch_size={2 ** int(math.log2(max(1, len(train_rows))))} or lower.")
    total_steps = cfg.run.epochs * steps_per_epoch
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    peak = peak_lr(cfg.optim, batch_size)
    pipeline = augment.build_train_pipeline(cfg.aug, size=size)
    labels_all = torch.as_tensor(prep.labels)

    data_gen = torch.Generator().manual_seed(cfg.run.seed)  # data order, on the CPU
    aug_gen = hardware.make_generator(hw.device, distributed.rank_seed(cfg.run.seed + 1, ranks.rank))  # augmentation, on the device, per rank
    start_epoch, start_step, best_acc, best_epoch, metrics = 0, 0, -1.0, -1, []
    partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "data": 0.0, "model": 0.0}
    state_file = out / "state.pt"
    source = resume_source(cfg, out)  # a finished run resumes too: it only redoes finish()
    if source:
        state = checkpoint.load_state(source / "state.pt")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if ema:
                ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"{source / 'state.pt'} does not fit this model and settings ({str(e).splitlines()[0][:200]}). "
                            f"Resume with the settings it was trained with (they are read from {source / 'config.yaml'}; "
                            "do not override model=, width= or ema=), or choose a new --out.") from None
        data_gen.set_state(state["data_gen_epoch_start"])
        rngs = rank_rngs(state, ranks)
        if rngs:
            aug_gen.set_state(rngs["aug_gen"].to(aug_gen.get_state().device))
            torch.set_rng_state(rngs["torch_rng"])
            if "cuda_rng" in rngs and hw.device.type == "cuda":
                torch.cuda.set_rng_state(rngs["cuda_rng"], hw.device)
        else:  # a rank the saved run did not have: fresh streams of its own, new for each resume point
            reseed = distributed.rank_seed(cfg.run.seed, ranks.rank, state["epoch"], state["step"])
            aug_gen.manual_seed(reseed)
            torch.manual_seed(reseed + 1)
        start_epoch, start_step = state["epoch"], state["step"]
        best_acc, best_epoch = state["best_acc"], state["best_epoch"]
        if ranks.is_main:  # the saved sums are over all ranks: rank 0 carries them, the others start at 0
            partial = state["partial"]
        # Only the epochs the state has finished: a kill can leave one more line, or half of one.
        lines = (source / "metrics.jsonl").read_text().splitlines()[:start_epoch]
        metrics = [json.loads(line) for line in lines]
        if source != out and ranks.is_main:
            for name in ("best.safetensors", "last.safetensors"):
                if (source / name).is_file():
                    checkpoint.write_bytes(out / name, (source / name).read_bytes())
    if ranks.is_main:
        checkpoint.write_text(out / "config.yaml", config.to_yaml(cfg))
        checkpoint.write_text(out / "manifest.json", json.dumps(
            {**manifest(cfg, prep, rows, hw), **({"processes": ranks.world} if ranks.active else {})}, indent=2))
        checkpoint.write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))

    # tensorboard=true: the epoch scalars as events in out/tensorboard/, flushed every epoch (rank 0 writes)
    board = report.TensorBoard(out) if cfg.run.tensorboard and ranks.is_main else None
    images = place_images(prep, hw, cfg.run.data_on_device)
    limit = config.parse_duration(cfg.run.time_limit)
    started, last_ckpt, eval_seconds = started or time.time(), time.time(), 0.0
    n_val, n_test = len(rows["val"]), len(rows.get("test", []))

    def save_state(epoch: int, step: int, epoch_gen_state: torch.Tensor, finished: bool = False) -> None:
        """Called on every rank at the same step (it gathers the ranks' generators); rank 0 writes."""
        rngs = {"aug_gen": aug_gen.get_state().cpu(),
                "torch_rng": torch.get_rng_state(),  # dropout on the CPU; on the GPU it draws from cuda_rng
                **({"cuda_rng": torch.cuda.get_rng_state(hw.device)} if hw.device.type == "cuda" else {})}
        all_rngs, totals = ranks.gather(rngs), sum_counts(partial, ranks)
        if not ranks.is_main:
            return
        checkpoint.save_state({
            "model": checkpoint.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            **({"ema": ema.state_dict()} if ema else {}),
            "data_gen_epoch_start": epoch_gen_state, **rngs,
            **({"rank_rngs": all_rngs} if ranks.active else {}),  # rank r's generators, for a resume on as many ranks
            "epoch": epoch, "step": step, "best_acc": best_acc, "best_epoch": best_epoch, "partial": totals,
            "finished": finished}, state_file)

    from tqdm.auto import tqdm  # progress display

    stopped = "done"
    epoch, step, epoch_gen_state = start_epoch, start_step, data_gen.get_state()
    with stop_on_signal() as signals, user_errors(cfg, out):
        for epoch in range(start_epoch, cfg.run.epochs):
            epoch_gen_state = data_gen.get_state()
            perm = torch.randperm(len(train_rows), generator=data_gen)
            model.train()
            bar = tqdm(range(start_step, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.run.epochs}", leave=False,
                       disable=not cfg.run.progress or not ranks.is_main, dynamic_ncols=True, unit="step")
            for step in bar:
                t0 = time.perf_counter()
                batch_rows = distributed.shard(train_rows[perm[step * batch_size:(step + 1) * batch_size]], ranks)
                lr = lr_at(epoch * steps_per_epoch + step, total=total_steps, warmup=warmup, peak=peak,
                           floor=peak * cfg.optim.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # --- the training step ---
                batch = images.index_select(0, batch_rows.to(images.device)).to(hw.device, non_blocking=True)  # images[rows]: 7x slower on the CPU
                labels = labels_all[batch_rows].to(hw.device, non_blocking=True)
                with torch.no_grad():
                    targets = augment.one_hot(labels, num_classes, cfg.optim.label_smoothing)
                    x, targets = augment.train_views(batch, targets, aug_gen, pipeline)
                    x, targets = augment.mix(x, targets, aug_gen, cfg.aug, epoch=epoch, epochs=cfg.run.epochs)
                    x = x.contiguous(memory_format=hw.memory_format)
                t1 = time.perf_counter()
                for k, (xs, ts) in enumerate(zip(x.chunk(cfg.optim.accum_steps), targets.chunk(cfg.optim.accum_steps))):
                    with distributed.no_sync(ddp, skip=k < cfg.optim.accum_steps - 1):  # one all-reduce per step
                        with hw.autocast():
                            logits = step_model(xs)
                        loss = loss_fn(logits.float(), ts, focal_gamma=cfg.optim.focal_gamma)
                        (loss / cfg.optim.accum_steps).backward()
                    partial["correct"] += (logits.argmax(1) == ts.argmax(1)).sum()
                    partial["loss"] += loss.detach() * len(xs)  # every micro-batch's loss, not the last one's
                if cfg.optim.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema:
                    ema.update_parameters(model)
                # --- bookkeeping ---
                partial["seen"] += len(x)
                t2 = time.perf_counter()
                partial["data"] += t1 - t0
                partial["model"] += t2 - t1
                partial["seconds"] += t2 - t0
                if step % 20 == 0 or step == steps_per_epoch - 1:  # .item() is a CPU-GPU sync point
                    mean_loss = check_finite(partial, epoch, step)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{float(partial['correct']) / max(1, partial['seen']):.3f}",
                                    img_s=f"{partial['seen'] / max(1e-9, partial['seconds']):.0f}", lr=f"{lr:.3g}")
                # --- stop (Ctrl-C, time_limit=) and checkpoints, between steps where the state is whole ---
                now = time.time()
                guess = eval_seconds or partial["seconds"] / partial["seen"] * n_val  # before the first eval
                if signals:
                    stopped = "interrupted"
                elif limit and now - started > limit - stop_reserve(eval_seconds=guess, step_seconds=t2 - t0,
                                                                    n_val=n_val, n_test=n_test, limit=limit):
                    stopped = "time_limit"
                due = bool(cfg.run.checkpoint_minutes and now - last_ckpt > cfg.run.checkpoint_minutes * 60)
                stopped, due = ranks.agree(stopped, due)  # all ranks stop and checkpoint at the same step
                if stopped != "done" or due:
                    check_finite(partial, epoch, step)  # never overwrite the last good checkpoint with NaNs
                    partial = _floats(partial)
                    save_state(epoch, step + 1, epoch_gen_state)
                    last_ckpt = now
                if stopped != "done":
                    break
            bar.close()
            if stopped != "done":
                break
            start_step = 0
            t_eval = time.perf_counter()
            val_loss, val_acc = val_score(eval_model, images, rows["val"], prep.labels, size=size, hw=hw,
                                          batch_size=cfg.run.eval_batch_size, ranks=ranks)
            eval_seconds = time.perf_counter() - t_eval
            partial = sum_counts(partial, ranks)  # all ranks' images; the timings are rank 0's
            seen = max(1, partial["seen"])
            m = {"epoch": epoch + 1, "train_loss": float(partial["loss"]) / seen,
                 "train_acc": float(partial["correct"]) / seen, "val_loss": val_loss, "val_acc": val_acc,
                 "lr": optimizer.param_groups[0]["lr"], "train_images": int(partial["seen"]),  # over all ranks
                 "seconds": partial["seconds"] + eval_seconds, "images_per_second": seen / max(1e-9, partial["seconds"]),
                 "data_seconds": partial["data"], "model_seconds": partial["model"], "eval_seconds": eval_seconds}
            if not math.isfinite(m["train_loss"]):
                raise FloatingPointError(f"loss is {m['train_loss']} at the end of epoch {epoch + 1}")
            metrics.append(m)
            improved = val_acc > best_acc  # the same on every rank: the score is reduced over all of them
            if improved:
                best_acc, best_epoch = val_acc, epoch + 1
            if ranks.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(m) + "\n")
                checkpoint.save_weights(eval_model, out / "last.safetensors")
                if improved:
                    checkpoint.save_weights(eval_model, out / "best.safetensors")
            partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "data": 0.0, "model": 0.0}
            save_state(epoch + 1, 0, data_gen.get_state(), finished=epoch + 1 == cfg.run.epochs)
            last_ckpt = time.time()
            if board:
                board.log(m)
            if on_epoch and ranks.is_main:
                on_epoch(m)
            stopped, _ = ranks.agree("interrupted" if signals else "done", False)
            if stopped != "done":  # Ctrl-C during the evaluation: this epoch's state is saved just above
                break

    if board:
        board.close()
    result = TrainResult(out, best_acc, metrics[-1]["val_acc"] if metrics else float("nan"), best_epoch,
                         len(metrics), stopped, metrics)
    if stopped != "interrupted" and ranks.is_main and (out / "best.safetensors").is_file():
        with user_errors(cfg, out):
            result.submission = finish(out, prep, rows, hw, eval_model, cfg, images=images)
    return result


def finish(out: Path, prep: Prepared, rows: dict[str, np.ndarray], hw: hardware.Hardware, model: nn.Module,
           cfg: Config, *, images: torch.Tensor | None = None) -> Path | None:
    """Best weights -> validation and test logits on disk, and the submission when there is a test split.
    `images`: the cache as fit() placed it (on the GPU when it fits), so it is not copied there again."""
    checkpoint.load_weights(model, out / "best.safetensors")
    size, bs = cfg.data.image_size, cfg.run.eval_batch_size
    images = prep.images if images is None else images
    val_logits = predict.infer(model, images, rows["val"], size=size, hw=hw, batch_size=bs)
    predict.save_probs(out / "val_logits.npz", ids=[prep.ids[i] for i in rows["val"]], classes=prep.classes,
                       logits=val_logits, labels=prep.labels[rows["val"]])
    if len(rows.get("test", [])) == 0:
        return None
    test_logits = predict.infer(model, images, rows["test"], size=size, hw=hw, batch_size=bs)
    ids = [prep.ids[i] for i in rows["test"]]
    predict.save_probs(out / "test_logits.npz", ids=ids, classes=prep.classes, logits=test_logits)
    preds = dict(zip(ids, test_logits.argmax(1).tolist()))
    return submission.write(prep.dataset, preds, out / "submission.csv")
