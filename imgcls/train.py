"""The training loop. `fit()` trains one model into a run directory and returns a TrainResult;
it prints nothing itself (the CLI passes `on_epoch` to show progress)."""
from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

import imgcls
from imgcls import augment, checkpoint, config, hardware, predict, submission
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
    """Epoch accumulators (device tensors while training) as plain numbers, for a checkpoint."""
    return {k: float(v) if torch.is_tensor(v) else v for k, v in partial.items()}


def fit(cfg: Config, prep: Prepared, out: str | Path, *, rows: dict[str, np.ndarray] | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = rows or prep.rows
    hw = hardware.resolve(cfg.run)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    num_classes, size, batch_size = prep.dataset.num_classes, cfg.data.image_size, cfg.run.batch_size
    memory_format = torch.channels_last if hw.channels_last else torch.contiguous_format

    model = create_model(cfg.model.model, num_classes, width=cfg.model.width, dropout=cfg.model.dropout)
    if cfg.model.init:
        checkpoint.load_weights(model, Path(cfg.model.init))
    model.to(hw.device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg.optim)
    ema = None
    if cfg.optim.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.optim.ema), use_buffers=True)
    eval_model = ema.module if ema else model
    step_model = torch.compile(model) if cfg.run.compile else model

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
    aug_gen = hardware.make_generator(hw.device, cfg.run.seed + 1)  # augmentation, on the device
    start_epoch, start_step, best_acc, best_epoch, metrics = 0, 0, -1.0, -1, []
    partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "data": 0.0, "model": 0.0}
    state_file = out / "state.pt"
    resume_from = Path(cfg.run.resume) / "state.pt" if cfg.run.resume else state_file
    if resume_from.is_file():
        state = checkpoint.load_state(resume_from)
        if state.get("finished"):
            raise UserError(f"The run in {resume_from.parent} has finished all its epochs; "
                            "choose a new --out (or raise epochs= and resume).")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema and "ema" in state:
            ema.load_state_dict(state["ema"])
        data_gen.set_state(state["data_gen_epoch_start"])
        aug_gen.set_state(state["aug_gen"].to(aug_gen.get_state().device))
        torch.set_rng_state(state["torch_rng"])
        start_epoch, start_step = state["epoch"], state["step"]
        best_acc, best_epoch, partial = state["best_acc"], state["best_epoch"], state["partial"]
        metrics = [json.loads(line) for line in (resume_from.parent / "metrics.jsonl").read_text().splitlines()
                   if line.strip()][:start_epoch]
        if resume_from.parent != out:
            for name in ("best.safetensors", "last.safetensors"):
                if (resume_from.parent / name).is_file():
                    (out / name).write_bytes((resume_from.parent / name).read_bytes())
    (out / "config.yaml").write_text(config.to_yaml(cfg))
    (out / "manifest.json").write_text(json.dumps(manifest(cfg, prep, rows, hw), indent=2))
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))

    images = place_images(prep, hw, cfg.run.data_on_device)
    limit = config.parse_duration(cfg.run.time_limit)
    t_start, last_ckpt, eval_seconds = time.time(), time.time(), 60.0

    def save_state(epoch: int, step: int, epoch_gen_state: torch.Tensor, finished: bool = False) -> None:
        checkpoint.save_state({
            "model": checkpoint.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            **({"ema": ema.state_dict()} if ema else {}),
            "data_gen_epoch_start": epoch_gen_state, "aug_gen": aug_gen.get_state().cpu(),
            "torch_rng": torch.get_rng_state(), "epoch": epoch, "step": step, "best_acc": best_acc,
            "best_epoch": best_epoch, "partial": partial, "finished": finished}, state_file)

    from tqdm.auto import tqdm  # progress display

    stopped = "done"
    epoch, step, epoch_gen_state = start_epoch, start_step, data_gen.get_state()
    try:
        for epoch in range(start_epoch, cfg.run.epochs):
            epoch_gen_state = data_gen.get_state()
            perm = torch.randperm(len(train_rows), generator=data_gen)
            model.train()
            bar = tqdm(range(start_step, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.run.epochs}", leave=False,
                       disable=not cfg.run.progress, dynamic_ncols=True, unit="step")
            for step in bar:
                t0 = time.perf_counter()
                batch_rows = train_rows[perm[step * batch_size:(step + 1) * batch_size]]
                lr = lr_at(epoch * steps_per_epoch + step, total=total_steps, warmup=warmup, peak=peak,
                           floor=peak * cfg.optim.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # --- the training step ---
                batch = images[batch_rows.to(images.device)].to(hw.device, non_blocking=True)
                labels = labels_all[batch_rows].to(hw.device, non_blocking=True)
                with torch.no_grad():
                    targets = augment.one_hot(labels, num_classes, cfg.optim.label_smoothing)
                    x, targets = augment.train_views(batch, targets, aug_gen, pipeline)
                    x = augment.normalize(x).contiguous(memory_format=memory_format)
                t1 = time.perf_counter()
                for xs, ts in zip(x.chunk(cfg.optim.accum_steps), targets.chunk(cfg.optim.accum_steps)):
                    with hw.autocast():
                        logits = step_model(xs)
                    loss = loss_fn(logits.float(), ts, focal_gamma=cfg.optim.focal_gamma)
                    (loss / cfg.optim.accum_steps).backward()
                    partial["correct"] += (logits.argmax(1) == ts.argmax(1)).sum()
                if cfg.optim.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema:
                    ema.update_parameters(model)
                # --- bookkeeping ---
                partial["loss"] += loss.detach() * len(x)
                partial["seen"] += len(x)
                t2 = time.perf_counter()
                partial["data"] += t1 - t0
                partial["model"] += t2 - t1
                partial["seconds"] += t2 - t0
                if step % 20 == 0 or step == steps_per_epoch - 1:  # .item() is a CPU-GPU sync point
                    mean_loss = float(partial["loss"]) / max(1, partial["seen"])
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"loss is {mean_loss} at epoch {epoch + 1}, step {step}")
                    bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{float(partial['correct']) / max(1, partial['seen']):.3f}",
                                    img_s=f"{partial['seen'] / max(1e-9, partial['seconds']):.0f}", lr=f"{lr:.3g}")
                now = time.time()
                if limit and now - t_start > limit - (2 * eval_seconds + 60):
                    stopped = "time_limit"
                elif cfg.run.checkpoint_minutes and now - last_ckpt > cfg.run.checkpoint_minutes * 60:
                    partial = _floats(partial)
                    save_state(epoch, step + 1, epoch_gen_state)
                    last_ckpt = now
                if stopped != "done":
                    partial = _floats(partial)
                    save_state(epoch, step + 1, epoch_gen_state)
                    break
            bar.close()
            if stopped != "done":
                break
            start_step = 0
            t_eval = time.perf_counter()
            val_loss, val_acc, _ = predict.evaluate(eval_model, images, rows["val"], prep.labels, size=size, hw=hw,
                                                    batch_size=cfg.run.eval_batch_size)
            eval_seconds = time.perf_counter() - t_eval
            seen = max(1, partial["seen"])
            m = {"epoch": epoch + 1, "train_loss": float(partial["loss"]) / seen,
                 "train_acc": float(partial["correct"]) / seen, "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
                 "seconds": partial["seconds"] + eval_seconds, "images_per_second": seen / max(1e-9, partial["seconds"]),
                 "data_seconds": partial["data"], "model_seconds": partial["model"], "eval_seconds": eval_seconds}
            if not math.isfinite(m["train_loss"]):
                raise FloatingPointError(f"loss is {m['train_loss']} at the end of epoch {epoch + 1}")
            metrics.append(m)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
            checkpoint.save_weights(eval_model, out / "last.safetensors")
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch + 1
                checkpoint.save_weights(eval_model, out / "best.safetensors")
            partial = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "data": 0.0, "model": 0.0}
            save_state(epoch + 1, 0, data_gen.get_state(), finished=epoch + 1 == cfg.run.epochs)
            last_ckpt = time.time()
            if on_epoch:
                on_epoch(m)
    except KeyboardInterrupt:
        partial = _floats(partial)
        save_state(epoch, step, epoch_gen_state)  # the interrupted step is redone on resume
        return TrainResult(out, best_acc, metrics[-1]["val_acc"] if metrics else float("nan"), best_epoch,
                           len(metrics), "interrupted", metrics)
    except FloatingPointError as e:
        raise UserError(f"Training diverged: {e}. The last good checkpoint is kept in {out}. "
                        "Lower lr=, set grad_clip=1.0, or amp=off, then rerun.") from None

    result = TrainResult(out, best_acc, metrics[-1]["val_acc"] if metrics else float("nan"), best_epoch,
                         len(metrics), stopped, metrics)
    if (out / "best.safetensors").is_file():
        result.submission = finish(out, prep, rows, hw, eval_model, cfg)
    return result


def finish(out: Path, prep: Prepared, rows: dict[str, np.ndarray], hw: hardware.Hardware, model: nn.Module,
           cfg: Config) -> Path | None:
    """Best weights -> validation and test logits on disk, and the submission when there is a test split."""
    checkpoint.load_weights(model, out / "best.safetensors")
    size, bs = cfg.data.image_size, cfg.run.eval_batch_size
    images = prep.images
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
