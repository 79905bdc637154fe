"""What a checkpoint holds. `TrainState` is exactly `state.pt`: model, optimizer, EMA, fp16's loss scale,
the random streams, the counters and the running sums of the epoch (`state_dict()` writes it,
`load_state_dict()` continues from it). `LossScale` is fp16's loss scaling with all its accounting;
under bf16 and fp32 it passes through.

Rank handling (torchrun data parallelism) sits at two points here: the model is wrapped once in
DistributedDataParallel, and `state_dict()` gathers every rank's generators and sums the epoch's counts.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn

from imgcls import checkpoint, distributed, finetune, hardware, optim
from imgcls.config import Config
from imgcls.errors import UserError
from imgcls.models import create_model


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


def empty_sums() -> dict:
    """The running sums of an epoch: over all ranks in a checkpoint, this rank's while training.
    finite: images whose micro-batch loss was finite (train_loss is the mean over them: all but fp16's
    overflowing ones); skipped: fp16 steps the GradScaler skipped (the same on every rank: DDP has
    averaged the gradients before the scaler looks at them)."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "finite": 0, "skipped": 0, "seconds": 0.0, "data": 0.0, "model": 0.0}


def floats(sums: dict) -> dict:
    """Epoch sums (device tensors while training) as plain numbers, for a checkpoint. Exact: a float32
    sum becomes the same float64, and adding the next float32 tensor gives the same bits."""
    return {k: v.item() if torch.is_tensor(v) else v for k, v in sums.items()}


def sum_counts(sums: dict, ranks: distributed.Ranks) -> dict:
    """Epoch sums over all ranks (loss, correct, seen, finite); the timings and skipped steps stay this
    rank's. One process: `sums`."""
    if not ranks.active:
        return sums
    loss, correct, seen, finite = ranks.sum([sums["loss"], sums["correct"], sums["seen"], sums["finite"]])
    return {**floats(sums), "loss": loss, "correct": int(correct), "seen": int(seen), "finite": int(finite)}


def rank_rngs(state: dict, ranks: distributed.Ranks) -> dict | None:
    """This rank's saved generator states (augmentation, dropout). A resume on as many ranks as the saved
    run continues every rank's streams exactly; on a different number, rank 0 continues the saved
    rank 0's streams and a rank the saved run did not have gets None (the caller reseeds it)."""
    saved = state.get("rank_rngs") or [{k: state[k] for k in ("aug_gen", "torch_rng", "cuda_rng") if k in state}]
    if len(saved) == ranks.world or ranks.rank == 0:
        return saved[ranks.rank]
    return None


class LossScale:
    """fp16's loss scaling (torch.amp.GradScaler) and what it counts: a micro-batch whose loss overflowed
    is left out of the epoch's mean loss, a step the scaler skipped is counted, and most steps skipped
    with the scale below 1 is divergence. bf16 and fp32: a pass-through that counts nothing."""

    def __init__(self, hw: hardware.Hardware):
        self.scaler = hw.grad_scaler()
        self.enabled = self.scaler.is_enabled()
        self.one = torch.ones((), device=hw.device)  # scaler.scale(one): the loss scale, without a sync point

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()  # fp16: scaled up, so small gradients do not flush to 0

    def add_loss(self, sums: dict, loss: torch.Tensor, n: int) -> None:
        """A micro-batch's loss into the epoch sums. fp16: a non-finite loss (the scaler skips that step)
        is left out of the mean and of `finite`; otherwise a NaN stays in the sum, for the NaN guard."""
        if self.enabled:
            ok = torch.isfinite(loss)
            sums["loss"] += torch.where(ok, loss, 0.0) * n
            sums["finite"] += ok.int() * n
        else:
            sums["loss"] += loss * n
            sums["finite"] += n

    def step(self, optimizer: torch.optim.Optimizer, model: nn.Module, *, clip: float, sums: dict) -> None:
        """Unscale and clip (torch.amp examples, "Gradient clipping": clip the true gradients), update
        unless a gradient is inf/NaN, and count a skipped step: the scale halves exactly when one is."""
        scale = self.scaler.scale(self.one)
        if clip:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        if self.enabled:
            sums["skipped"] += (self.scaler.scale(self.one) < scale).int()

    def check(self, sums: dict, *, steps: int, epoch: int) -> None:
        """fp16: some skipped steps are normal (the scaler starts at 2^16 and halves per skip until the
        gradients fit, then doubles every 2000 steps and finds the edge again). Divergence: most of this
        epoch's steps skipped and the scale below 1, where gradients overflow even unscaled (torch's
        GradScaler.update docs: "If the scale falls below 1 ... something is likely wrong")."""
        if not self.enabled:
            return
        skipped, scale = int(sums["skipped"]), self.scaler.get_scale()
        if 2 * skipped > steps and scale < 1:
            raise FloatingPointError(f"{skipped} of the {steps} fp16 steps of epoch {epoch + 1} overflowed and "
                                     f"the loss scale fell to {scale:.3g} (amp=bf16 or amp=off avoid fp16's range)")

    def row(self, sums: dict) -> dict:
        """fp16: steps the scaler skipped on overflow, and where the scale stands; nothing otherwise."""
        return {"skipped_steps": int(sums["skipped"]), "loss_scale": self.scaler.get_scale()} if self.enabled else {}


class TrainState:
    """One model being trained, and everything a resume needs: model, optimizer, ema, loss scale,
    data_gen (data order, CPU), aug_gen (augmentation, on the device), torch's global RNG (dropout),
    epoch and step (the next step to take within `epoch`), best_acc and best_epoch, sums (the epoch so
    far), epoch_gen_state (data_gen at the start of `epoch`), finished (every epoch of the schedule done: the loop
    sets it, since a resume may continue a finished state with a longer schedule)."""

    def __init__(self, cfg: Config, num_classes: int, hw: hardware.Hardware, ranks: distributed.Ranks, *,
                 ema_decay: float):
        seed_everything(cfg.run.seed, cfg.run.deterministic)  # before the model: its init draws from torch's RNG
        model = create_model(cfg.model.model, num_classes, width=cfg.model.width, dropout=cfg.model.dropout)
        self.pretrained = finetune.load_init(model, cfg.model.init) if cfg.model.init else None  # the manifest's record
        self.mean_std = finetune.mean_std(model, cfg)  # None: ImageNet's, as every view normalizes
        finetune.renormalize(model, self.mean_std)
        if cfg.optim.freeze_epochs and ranks.active:
            raise UserError("freeze_epochs= trains the classifier alone, which DistributedDataParallel cannot follow "
                            "(it expects a gradient for every parameter): train on one process, or set freeze_epochs=0.")
        model.to(hw.device, memory_format=hw.memory_format)
        self.ddp = distributed.wrap(model, ranks, hw.device, sync_bn=cfg.run.sync_bn)  # the model itself on one process
        self.model = checkpoint.unwrap(self.ddp)  # the plain module (SyncBatchNorm layers under sync_bn=true)
        if ranks.rank:  # dropout: a stream of its own on each rank but 0 (which draws what one process draws)
            torch.manual_seed(distributed.rank_seed(cfg.run.seed, ranks.rank))
        self.optimizer = optim.build_optimizer(self.model, cfg.optim)
        self.ema = optim.build_ema(self.model, ema_decay)
        self.step_model = torch.compile(self.ddp) if hw.compile else self.ddp  # hw: off where Triton cannot run
        self.scale = LossScale(hw)
        self.data_gen = torch.Generator().manual_seed(cfg.run.seed)
        self.aug_gen = hardware.make_generator(hw.device, distributed.rank_seed(cfg.run.seed + 1, ranks.rank))
        self.epoch, self.step, self.best_acc, self.best_epoch, self.finished = 0, 0, -1.0, -1, False
        self.sums = empty_sums()
        self.epoch_gen_state = self.data_gen.get_state()
        self.hw, self.ranks, self.seed = hw, ranks, cfg.run.seed

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are scored and saved: the EMA when there is one."""
        return self.ema.module if self.ema else self.model

    def follow(self, decay: float) -> None:
        """A new schedule's EMA horizon (ema=auto): while the average is still the initial weights it starts
        afresh; mid-run (a shorter plan) the average so far stays and its horizon follows."""
        if self.ema and (self.epoch, self.step) != (0, 0):
            self.ema.multi_avg_fn = optim.ema_update(decay)
        else:
            self.ema = optim.build_ema(self.model, decay)

    def state_dict(self) -> dict:
        """What state.pt holds. Collective: every rank calls it at the same step (it gathers the ranks'
        generators and sums the epoch's counts); only rank 0's result is written."""
        self.sums = floats(self.sums)  # plain numbers from here on, in the saved and the running run alike
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
                "scaler": self.scale.scaler.state_dict()}  # fp16's loss scale and growth tracker; {} otherwise

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(). The saved epoch sums are over all ranks: rank 0 carries them.
        Raises RuntimeError/KeyError/ValueError when the state was made for another model or settings."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scale.enabled:  # an fp16 state (older states have no entry)
            self.scale.scaler.load_state_dict(state["scaler"])
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
            reseed = distributed.rank_seed(self.seed, self.ranks.rank, state["epoch"], state["step"])
            self.aug_gen.manual_seed(reseed)
            torch.manual_seed(reseed + 1)
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]
        partial = {**empty_sums(), "finite": state["partial"]["seen"], **state["partial"]}  # older states: all finite
        # Skipped steps are the same count on every rank (not a sum): each carries it, so the divergence
        # rule (LossScale.check) decides alike on all ranks after a resume.
        self.sums = partial if self.ranks.is_main else {**empty_sums(), "skipped": partial["skipped"]}
