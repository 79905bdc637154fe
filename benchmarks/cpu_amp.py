"""Training-step throughput on the CPU: fp32 vs channels_last vs channels_last + bf16 autocast.

What `imgcls/hardware.py` decides from: on the CPU, amp=auto is off and channels_last=auto is on.
One train step = forward, loss, backward and an SGD step on a random batch, as `Trainer.train_step` runs it.
Images/s is the median of `--repeats` timings of `--steps` steps each, after 2 warm-up steps.

    flock /tmp/imgcls-cpu.lock python benchmarks/cpu_amp.py [--models resnet18s resnet18s:16 tinycnn] [--size 64]
        [--batch 64] [--steps 3] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from imgcls.models import create_model

VARIANTS = {  # name -> (memory format, autocast dtype or None)
    "fp32": (torch.contiguous_format, None),
    "fp32 channels_last": (torch.channels_last, None),
    "bf16 channels_last": (torch.channels_last, torch.bfloat16),
}  # bf16 on NCHW is left out: 0.15x of fp32 in a first try (tinycnn width 8, 16 px, batch 8), far the slowest


def images_per_second(model_name: str, *, width: int, size: int, batch: int, steps: int, repeats: int,
                      memory_format: torch.memory_format, amp: torch.dtype | None) -> float:
    torch.manual_seed(0)
    model = create_model(model_name, 100, width=width).to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 100, (batch,))

    def step():
        with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # oneDNN picks and caches its kernels on the first calls
        step()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18s", "resnet18s:16", "tinycnn"],
                   help="registered names, optionally name:width (e.g. resnet18s:16)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {args.size} px, batch {args.batch}")
    for spec in args.models:
        name, _, width = spec.partition(":")
        rates = {v: images_per_second(name, width=int(width or 0), size=args.size, batch=args.batch, steps=args.steps,
                                      repeats=args.repeats, memory_format=mf, amp=amp)
                 for v, (mf, amp) in VARIANTS.items()}
        base = rates["fp32"]
        print(f"{spec:14s} " + "  ".join(f"{v}: {r:7.1f} img/s ({r / base:.2f}x)" for v, r in rates.items()))


if __name__ == "__main__":
    main()
