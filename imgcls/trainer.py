"""The Trainer: everything a checkpoint must hold (model, optimizer, EMA, generators, counters, best
score) in one object, and the training step. `state_dict()` is exactly what `state.pt` holds and
`load_state_dict()` continues from it; `training.fit()` is the loop that calls them.

Rank handling (torchrun data parallelism) sits at four points: the model is wrapped once in
DistributedDataParallel, each batch is sharded, the validation score and the epoch sums are reduced
over the ranks, and `state_dict()` gathers every rank's generators.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from imgcls import augment, checkpoint, config, distributed, finetune, hardware, inference, optim, recipes
from imgcls.config import Config
from imgcls.data import Prepared
from imgcls.errors import UserError
from imgcls.losses import loss_fn
from imgcls.models import create_model

CHECK_EVERY = 20  # steps between NaN checks and progress updates: .item() is a CPU-GPU sync point


def empty_sums() -> dict:
    """The running sums of an epoch: over all ranks in a checkpoint, this rank's while training.
    finite: images whose micro-batch loss was finite (train_loss is the mean over them: all but fp16's
    overflowing ones); skipped: fp16 steps the GradScaler skipped (the same on every rank: DDP has
    averaged the gradients before the scaler looks at them)."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "finite": 0, "skipped": 0, "seconds": 0.0, "data": 0.0, "model": 0.0}


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


def _floats(sums: dict) -> dict:
    """Epoch sums (device tensors while training) as plain numbers, for a checkpoint. Exact: a float32
    sum becomes the same float64, and adding the next float32 tensor gives the same bits."""
    return {k: v.item() if torch.is_tensor(v) else v for k, v in sums.items()}


def sum_counts(sums: dict, ranks: distributed.Ranks) -> dict:
    """Epoch sums over all ranks (loss, correct, seen, finite); the timings and skipped steps stay this
    rank's. One process: `sums`."""
    if not ranks.active:
        return sums
    loss, correct, seen, finite = ranks.sum([sums["loss"], sums["correct"], sums["seen"], sums["finite"]])
    return {**_floats(sums), "loss": loss, "correct": int(correct), "seen": int(seen), "finite": int(finite)}


def add_loss(sums: dict, loss: torch.Tensor, n: int, *, fp16: bool) -> None:
    """A micro-batch's loss into the epoch sums. fp16: a non-finite loss (the scaler skips that step)
    is left out of the mean and of `finite`; otherwise a NaN stays in the sum, for the NaN guard."""
    if fp16:
        ok = torch.isfinite(loss)
        sums["loss"] += torch.where(ok, loss, 0.0) * n
        sums["finite"] += ok.int() * n
    else:
        sums["loss"] += loss * n
        sums["finite"] += n


def rank_rngs(state: dict, ranks: distributed.Ranks) -> dict | None:
    """This rank's saved generator states (augmentation, dropout). A resume on as many ranks as the saved
    run continues every rank's streams exactly; on a different number, rank 0 continues the saved
    rank 0's streams and a rank the saved run did not have gets None (the caller reseeds it)."""
    saved = state.get("rank_rngs") or [{k: state[k] for k in ("aug_gen", "torch_rng", "cuda_rng") if k in state}]
    if len(saved) == ranks.world or ranks.rank == 0:
        return saved[ranks.rank]
    return None


def val_score(model: nn.Module, images: torch.Tensor, rows: np.ndarray, labels: np.ndarray, *, size: int, crop: float,
              hw: hardware.Hardware, batch_size: int, ranks: distributed.Ranks) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the validation rows. Over several ranks each scores every
    world-th row with rank 0's weights and the sums are reduced, so all ranks get the same numbers."""
    if not ranks.active:
        return inference.evaluate(model, images, rows, labels, size=size, hw=hw, batch_size=batch_size, crop=crop)[:2]
    distributed.sync_state(model, ranks)
    mine = rows[ranks.rank::ranks.world]
    loss, acc = (inference.evaluate(model, images, mine, labels, size=size, hw=hw, batch_size=batch_size, crop=crop)[:2]
                 if len(mine) else (0.0, 0.0))
    loss_sum, correct, n = ranks.sum([loss * len(mine), acc * len(mine), len(mine)])
    return loss_sum / n, correct / n


class Trainer:
    """One model being trained on `rows["train"]` of `prep`, scored on `rows["val"]`.

    State: model, optimizer, ema, data_gen (data order, CPU), aug_gen (augmentation, on the device),
    torch's global RNG (dropout), epoch and step (the next step to take within `epoch`), best_acc and
    best_epoch, sums (the epoch so far), epoch_gen_state (data_gen at the start of `epoch`)."""

    def __init__(self, cfg: Config, prep: Prepared, rows: dict[str, np.ndarray], hw: hardware.Hardware,
                 ranks: distributed.Ranks):
        self.cfg, self.prep, self.rows, self.hw, self.ranks = cfg, prep, rows, hw, ranks
        seed_everything(cfg.run.seed, cfg.run.deterministic)  # before the model: its init draws from torch's RNG
        self.num_classes, self.batch_size = prep.dataset.num_classes, cfg.run.batch_size
        self.eval_size = config.eval_size(cfg.data)
        self.train_rows = torch.as_tensor(rows["train"])
        if len(self.train_rows) < self.batch_size:
            raise UserError(f"batch_size={self.batch_size} is larger than the {len(self.train_rows)} training images; "
                            f"set batch_size={2 ** int(math.log2(max(1, len(self.train_rows))))} or lower.")
        self.steps_per_epoch = len(self.train_rows) // self.batch_size  # the last partial batch is dropped
        self.epochs = cfg.run.epochs if cfg.run.epochs != "auto" else 1  # epochs=auto: set_epochs() once planned
        self.total_steps = self.epochs * self.steps_per_epoch
        self.warmup = int(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.peak = optim.peak_lr(cfg.optim, self.batch_size)

        self.model = create_model(cfg.model.model, self.num_classes, width=cfg.model.width, dropout=cfg.model.dropout)
        self.pretrained = finetune.load_init(self.model, cfg.model.init) if cfg.model.init else None  # the manifest's record
        self.mean_std = finetune.mean_std(self.model, cfg)  # None: ImageNet's, as every view normalizes
        finetune.renormalize(self.model, self.mean_std)
        if cfg.optim.freeze_epochs and ranks.active:
            raise UserError("freeze_epochs= trains the classifier alone, which DistributedDataParallel cannot follow "
                            "(it expects a gradient for every parameter): train on one process, or set freeze_epochs=0.")
        self.model.to(hw.device, memory_format=hw.memory_format)
        self.ddp = distributed.wrap(self.model, ranks, hw.device, sync_bn=cfg.run.sync_bn)  # the model itself on one process
        self.model = checkpoint.unwrap(self.ddp)  # the plain module (SyncBatchNorm layers under sync_bn=true)
        if ranks.rank:  # dropout: a stream of its own on each rank but 0 (which draws what one process draws)
            torch.manual_seed(distributed.rank_seed(cfg.run.seed, ranks.rank))
        self.optimizer = optim.build_optimizer(self.model, cfg.optim)
        self.ema = optim.build_ema(self.model, optim.ema_decay(cfg.optim.ema, self.total_steps))
        self.step_model = torch.compile(self.ddp) if hw.compile else self.ddp  # hw: off where Triton cannot run
        self.scaler = hw.grad_scaler()  # fp16 loss scaling; a pass-through for bf16 and fp32
        self.one = torch.ones((), device=hw.device)  # scaler.scale(one): the loss scale, without a sync point
        self.pipelines: dict[int, list] = {}  # training size -> the augmentation at that size
        self.labels = torch.as_tensor(prep.labels)
        self.images: torch.Tensor | None = None  # the cache as place_images() put it; set by the caller

        self.data_gen = torch.Generator().manual_seed(cfg.run.seed)
        self.aug_gen = hardware.make_generator(hw.device, distributed.rank_seed(cfg.run.seed + 1, ranks.rank))
        self.epoch, self.step, self.best_acc, self.best_epoch = 0, 0, -1.0, -1
        self.sums = empty_sums()
        self.epoch_gen_state = self.data_gen.get_state()
        self.lr, self.step_seconds, self.eval_seconds = 0.0, 0.0, 0.0

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are scored and saved: the EMA when there is one."""
        return self.ema.module if self.ema else self.model

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs

    @property
    def has_val(self) -> bool:
        return len(self.rows["val"]) > 0  # holdout=none: every labelled image trains

    @property
    def size(self) -> int:
        """px this epoch trains at (progressive resizing: smaller in the first epochs)."""
        d = self.cfg.data
        return optim.size_at(self.epoch, epochs=self.epochs, size=d.image_size, scale=d.prog_scale, end=d.prog_end)

    def set_epochs(self, epochs: int) -> None:
        """The planned length of an epochs=auto run: the schedules, and aug=auto's preset, follow it
        (the preset is named in cfg at the first plan, so a later, shorter plan keeps it)."""
        self.epochs = self.cfg.run.epochs = epochs
        self.total_steps = epochs * self.steps_per_epoch
        if self.cfg.optim.ema == "auto":
            decay = optim.ema_decay("auto", self.total_steps)
            if self.ema is None or (self.epoch, self.step) == (0, 0):  # the average is still the initial weights
                self.ema = optim.build_ema(self.model, decay)
            else:  # a shorter plan mid-run (training.replan): the average so far stays, its horizon follows
                self.ema.multi_avg_fn = optim.ema_update(decay)
        if self.cfg.aug.aug == "auto":
            recipes.fill_aug(self.cfg, epochs)
        self.pipelines.clear()

    def pipeline(self) -> list:
        if self.size not in self.pipelines:
            self.pipelines[self.size] = augment.build_train_pipeline(self.cfg.aug, size=self.size)
        return self.pipelines[self.size]

    # --- the step ------------------------------------------------------------------------------

    def batches(self) -> Iterator[torch.Tensor]:
        """The rest of this epoch's global batches, from `step` on, as this rank's slice of cache rows.
        Every rank draws the same order."""
        self.model.train()  # evaluation left it in eval mode
        if self.cfg.optim.freeze_epochs:
            finetune.set_frozen(self.model, self.epoch < self.cfg.optim.freeze_epochs)
        self.epoch_gen_state = self.data_gen.get_state()
        perm = torch.randperm(len(self.train_rows), generator=self.data_gen)
        b = self.batch_size
        for step in range(self.step, self.steps_per_epoch):
            yield distributed.shard(self.train_rows[perm[step * b:(step + 1) * b]], self.ranks)

    def train_step(self, batch_rows: torch.Tensor) -> None:
        """One optimizer step on one batch: augment on the device (the data path), then model_step().
        Running sums stay on the device (no sync point)."""
        t0 = time.perf_counter()
        self.set_lr(optim.lr_at(self.epoch * self.steps_per_epoch + self.step, total=self.total_steps,
                                warmup=self.warmup, peak=self.peak, cfg=self.cfg.optim))
        x, targets = self.augmented_batch(batch_rows)
        t1 = time.perf_counter()
        self.model_step(x, targets)
        t2 = time.perf_counter()
        self.step += 1
        self.step_seconds = t2 - t0
        self.sums["seen"] += len(x)
        self.sums["data"] += t1 - t0
        self.sums["model"] += t2 - t1
        self.sums["seconds"] += t2 - t0

    def augmented_batch(self, batch_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows -> (normalized, augmented, mixed images in the memory format; soft targets) on the device."""
        cfg, hw = self.cfg, self.hw
        batch = self.images.index_select(0, batch_rows.to(self.images.device)).to(hw.device, non_blocking=True)  # images[rows]: 7x slower on the CPU
        labels = self.labels[batch_rows].to(hw.device, non_blocking=True)
        with torch.no_grad():
            targets = augment.one_hot(labels, self.num_classes, cfg.optim.label_smoothing)
            x, targets = augment.train_views(batch, targets, self.aug_gen, self.pipeline())
            x, targets = augment.mix(x, targets, self.aug_gen, cfg.aug, epoch=self.epoch, epochs=self.epochs)
        return x.contiguous(memory_format=hw.memory_format), targets

    def model_step(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        """Forward and backward per micro-batch, update, EMA (benchmarks/gpu_check.py times it alone)."""
        cfg, hw, accum = self.cfg, self.hw, self.cfg.optim.accum_steps
        fp16, scale = self.scaler.is_enabled(), self.scaler.scale(self.one)
        for k, (xs, ts) in enumerate(zip(x.chunk(accum), targets.chunk(accum))):
            with distributed.no_sync(self.ddp, skip=k < accum - 1):  # one all-reduce per step
                with hw.autocast():
                    logits = self.step_model(xs)
                loss = loss_fn(logits.float(), ts, focal_gamma=cfg.optim.focal_gamma)
                self.scaler.scale(loss / accum).backward()  # fp16: scaled up, so small gradients do not flush to 0
            self.sums["correct"] += (logits.argmax(1) == ts.argmax(1)).sum()
            add_loss(self.sums, loss.detach(), len(xs), fp16=fp16)  # every micro-batch's loss, not the last one's
        if cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (torch.amp examples, "Gradient clipping")
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)  # fp16: no update when a gradient is inf/NaN
        self.scaler.update()  # ... and the scale halves, so it dropped exactly when the step was skipped:
        if fp16:
            self.sums["skipped"] += (self.scaler.scale(self.one) < scale).int()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update_parameters(self.model)

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_backbone= (finetune.param_groups)

    def check_finite(self) -> float:
        """Mean training loss so far this epoch; NaN/inf raises, so it never reaches a checkpoint. Under
        fp16 the mean is over the finite losses: an overflow the scaler skipped is no divergence."""
        mean_loss = float(self.sums["loss"]) / max(1, int(self.sums["finite"]))  # .item(): a CPU-GPU sync point
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} in epoch {self.epoch + 1} by step {self.step}")
        self.check_overflow()
        return mean_loss

    def check_overflow(self) -> None:
        """fp16: some skipped steps are normal (the scaler starts at 2^16 and halves per skip until the
        gradients fit, then doubles every 2000 steps and finds the edge again). Divergence: most of this
        epoch's steps skipped and the scale below 1, where gradients overflow even unscaled (torch's
        GradScaler.update docs: "If the scale falls below 1 ... something is likely wrong")."""
        if not self.scaler.is_enabled():
            return
        skipped, scale = int(self.sums["skipped"]), self.scaler.get_scale()
        if 2 * skipped > self.step and scale < 1:
            raise FloatingPointError(f"{skipped} of the {self.step} fp16 steps of epoch {self.epoch + 1} overflowed and "
                                     f"the loss scale fell to {scale:.3g} (amp=bf16 or amp=off avoid fp16's range)")

    # --- the epoch's end -----------------------------------------------------------------------

    def score(self) -> dict:
        """val_loss and val_acc of the weights that are saved; none without held-out images."""
        if not self.has_val:
            return {}
        loss, acc = val_score(self.eval_model, self.images, self.rows["val"], self.prep.labels, size=self.eval_size,
                              crop=self.cfg.data.eval_crop,
                              hw=self.hw, batch_size=self.cfg.run.eval_batch_size, ranks=self.ranks)
        return {"val_loss": loss, "val_acc": acc}

    def end_epoch(self) -> tuple[dict, bool]:
        """Score the epoch's weights, turn its sums into a metrics row, move on to the next epoch.
        Returns (metrics row, whether the score is the best so far)."""
        t_eval = time.perf_counter()
        scores = self.score()
        self.eval_seconds = time.perf_counter() - t_eval
        sums = sum_counts(self.sums, self.ranks)  # all ranks' images; the timings are this rank's
        seen, finite = max(1, sums["seen"]), int(sums["finite"])
        m = {"epoch": self.epoch + 1, "train_loss": float(sums["loss"]) / finite if finite else math.nan,
             "train_acc": float(sums["correct"]) / seen, **scores,
             "lr": self.optimizer.param_groups[0]["lr"], "train_images": int(sums["seen"]),  # over all ranks
             "seconds": sums["seconds"] + self.eval_seconds, "images_per_second": seen / max(1e-9, sums["seconds"]),
             "data_seconds": sums["data"], "model_seconds": sums["model"], "eval_seconds": self.eval_seconds,
             "image_size": self.size}
        if self.scaler.is_enabled():  # fp16: steps the scaler skipped on overflow, and where the scale stands
            m.update(skipped_steps=int(sums["skipped"]), loss_scale=self.scaler.get_scale())
        if not math.isfinite(m["train_loss"]):
            raise FloatingPointError(f"loss is {m['train_loss']} at the end of epoch {self.epoch + 1}")
        # The same on every rank (the score is reduced over all of them); no held-out images: the last is kept.
        improved = scores["val_acc"] > self.best_acc if self.has_val else True
        if improved:
            self.best_acc, self.best_epoch = scores.get("val_acc", float("nan")), self.epoch + 1
        self.epoch, self.step, self.sums = self.epoch + 1, 0, empty_sums()
        self.epoch_gen_state = self.data_gen.get_state()
        return m, improved

    # --- checkpoint ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What state.pt holds. Collective: every rank calls it at the same step (it gathers the ranks'
        generators and sums the epoch's counts); only rank 0's result is written."""
        self.sums = _floats(self.sums)  # plain numbers from here on, in the saved and the running run alike
        rngs = {"aug_gen": self.aug_gen.get_state().cpu(),
                "torch_rng": torch.get_rng_state(),  # dropout on the CPU; on the GPU it draws from cuda_rng
                **({"cuda_rng": torch.cuda.get_rng_state(self.hw.device)} if self.hw.device.type == "cuda" else {})}
        all_rngs, totals = self.ranks.gather(rngs), sum_counts(self.sums, self.ranks)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **({"ema": self.ema.state_dict()} if self.ema else {}),
                "data_gen_epoch_start": self.epoch_gen_state, **rngs,
                **({"rank_rngs": all_rngs} if self.ranks.active else {}),  # rank r's generators, for a resume on as many ranks
                "epoch": self.epoch, "step": self.step, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "partial": totals, "finished": self.finished,
                "scaler": self.scaler.state_dict()}  # fp16's loss scale and growth tracker; {} otherwise

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(). The saved epoch sums are over all ranks: rank 0 carries them.
        Raises RuntimeError/KeyError/ValueError when the state was made for another model or settings."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():  # an fp16 state (older states have no entry)
            self.scaler.load_state_dict(state["scaler"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.data_gen.set_state(state["data_gen_epoch_start"])
        self.epoch_gen_state = state["data_gen_epoch_start"]
        rngs = rank_rngs(state, self.ranks)
        if rngs:
            self.aug_gen.set_state(rngs["aug_gen"].to(self.aug_gen.get_state().device))
            torch.set_rng_state(rngs["torch_rng"])
            if "cuda_rng" in rngs and self.hw.device.type == "cuda":
                torch.cuda.set_rng_state(rngs["cuda_rng"], self.hw.device)
        else:  # a rank the saved run did not have: fresh streams of its own, new for each resume point
            reseed = distributed.rank_seed(self.cfg.run.seed, self.ranks.rank, state["epoch"], state["step"])
            self.aug_gen.manual_seed(reseed)
            torch.manual_seed(reseed + 1)
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]
        partial = {**empty_sums(), "finite": state["partial"]["seen"], **state["partial"]}  # older states: all finite
        # Skipped steps are the same count on every rank (not a sum): each carries it, so the divergence
        # rule (check_overflow) decides alike on all ranks after a resume.
        self.sums = partial if self.ranks.is_main else {**empty_sums(), "skipped": partial["skipped"]}
