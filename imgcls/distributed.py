"""Data-parallel training over torch.distributed, for `torchrun --nproc_per_node N -m imgcls train`
(issue 8). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (plain `imgcls train`, or
torchrun with one process) nothing here starts a process group and every helper is a no-op, so a
single process trains exactly as before.

Every rank draws the same data order (the generator is seeded alike on all ranks) and takes its
contiguous slice of each global batch; DistributedDataParallel averages the gradients, so with
equal slices the update is the one a single process makes on the whole global batch.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from imgcls.errors import UserError

STOPS = ("done", "pruned", "time_limit", "interrupted")  # in order of precedence when ranks are combined
# Generous: rank 0 may decode a large cache (tiny-imagenet, 100k photos) while the others wait.
CONTROL_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the training processes. The default is one process."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # rank within this machine (node)
    control: object = None  # a gloo group for small CPU messages (stop flags, RNG states); None = default group

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.control)

    def agree(self, stopped: str, checkpoint_due: bool) -> tuple[str, bool]:
        """Every rank's stop decision and checkpoint clock -> one decision for all: the strongest stop any
        rank asks for (a signal may reach one rank only) and a checkpoint if any rank's clock says so.
        All ranks then stop at the same step; a rank that stopped alone would leave the others waiting
        in the next gradient all-reduce forever. CPU tensors over gloo: no GPU sync point."""
        if not self.active:
            return stopped, checkpoint_due
        flags = torch.tensor([STOPS.index(stopped), int(checkpoint_due)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
        return STOPS[int(flags[0])], bool(flags[1])

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 on the CPU."""
        if not self.active:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t, group=self.control)
        return t.tolist()

    def gather(self, obj) -> list:
        """One picklable object per rank, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out


def from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init(device: torch.device) -> Ranks:
    """Join the process group torchrun describes: NCCL between GPUs, gloo on the CPU. One process
    (no torchrun, or --nproc_per_node 1): no process group at all."""
    rank, world, local_rank = from_env()
    if world <= 1:
        return Ranks()
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started local rank {local_rank} but this machine shows "
                            f"{torch.cuda.device_count()} GPU(s): set --nproc_per_node to at most the GPU count.")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        # Stop flags and RNG states are a few bytes: over gloo they cost no GPU synchronization.
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=CONTROL_TIMEOUT)
        control = None
    return Ranks(rank, world, local_rank, control)


def shutdown(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def node_leader_first(ranks: Ranks):
    """The first process on each machine runs the block (e.g. decoding the image cache) while the
    others wait; then they run it too, and find the cache built."""
    if ranks.local_rank != 0:
        ranks.barrier()
    yield
    if ranks.local_rank == 0:
        ranks.barrier()


def check_batch(batch_size: int, world: int, accum_steps: int) -> None:
    """batch_size= is the global batch; each rank must get an equal slice (equal slices make DDP's
    gradient average the global-batch mean), itself divisible into accum_steps micro-batches."""
    if world > 1 and batch_size % (world * accum_steps):
        step = world * accum_steps
        fixed = max(step, batch_size // step * step)
        raise UserError(f"batch_size={batch_size} is the global batch and must split evenly over the {world} "
                        f"processes{f' and accum_steps={accum_steps}' if accum_steps > 1 else ''}: use a multiple "
                        f"of {step}, e.g. batch_size={fixed} (lr= is per 512 images, so it follows).")


def shard(batch_rows: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous slice of the global batch (all ranks hold the same batch_rows)."""
    if not ranks.active:
        return batch_rows
    n = len(batch_rows) // ranks.world
    return batch_rows[ranks.rank * n:(ranks.rank + 1) * n]


def rank_seed(seed: int, rank: int, *extra: int) -> int:
    """A seed for this rank's own random stream (augmentation, dropout): `seed` itself on rank 0, so
    one process draws exactly what plain `imgcls train` draws; otherwise a SeedSequence hash of
    (seed, rank, extra), which never collides with another seed's or rank's stream."""
    if rank == 0 and not extra:
        return seed
    return int(np.random.SeedSequence([seed, rank, *extra]).generate_state(1, np.uint64)[0] >> 1)


def wrap(model: nn.Module, ranks: Ranks, device: torch.device, *, sync_bn: bool) -> nn.Module:
    """The module the training step calls: DistributedDataParallel over `model` (which keeps its
    parameters, so the optimizer, EMA and checkpoints use the plain module), or `model` itself."""
    if not ranks.active:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise UserError("sync_bn=true needs GPUs: torch.nn.SyncBatchNorm runs only on CUDA. On the CPU "
                            "leave sync_bn=false (each process then normalizes over its own slice of the batch).")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # shares the parameters and buffers
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: nn.Module, skip: bool):
    """Gradient accumulation: skip DDP's all-reduce on every micro-batch but the last."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def sync_state(model: nn.Module, ranks: Ranks) -> None:
    """Copy rank 0's parameters and buffers to every rank. Without sync_bn each rank's BatchNorm
    running statistics (and an EMA of them) follow its own slice; evaluating with rank 0's, which are
    the ones saved, makes the sharded validation score exactly the saved weights."""
    if ranks.active:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
