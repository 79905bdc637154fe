"""Training-step throughput on the CPU: fp32 vs channels_last vs channels_last + bf16 autocast.

What `imgcls/hardware.py` decides from: on the CPU, amp=auto is off and channels_last=auto is on.
One train step = forward, loss, backward and an SGD step on a random batch, as `trainer.model_step` runs it.
Images/s is the median of `--repeats` timings of `--steps` steps each, after 2 warm-up steps.
`--compile` adds bf16 channels_last under torch.compile (inductor's C++ backend, as `compile=true`
runs the model on the CPU) and prints the seconds its first step took: the compile a run pays once.

    flock /tmp/imgcls.lock python benchmarks/cpu_amp.py [--models resnet18s resnet18s:16 tinycnn] [--size 64]
        [--batch 64] [--steps 3] [--repeats 3] [--compile]
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
                      memory_format: torch.memory_format, amp: torch.dtype | None,
                      compile_: bool = False) -> tuple[float, float]:
    """(median images/s, seconds of the first step)."""
    torch.manual_seed(0)
    model = create_model(model_name, 100, width=width).to(memory_format=memory_format).train()
    step_model = torch.compile(model) if compile_ else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 100, (batch,))

    def step():
        with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
            logits = step_model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # torch.compile compiles here
    first = time.perf_counter() - t0
    step()  # oneDNN picks and caches its kernels on the first calls
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - t0))
    return statistics.median(rates), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18s", "resnet18s:16", "tinycnn"],
                   help="registered names, optionally name:width (e.g. resnet18s:16)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also bf16 channels_last under torch.compile")
    args = p.parse_args()
    variants = {v: (mf, amp, False) for v, (mf, amp) in VARIANTS.items()}
    if args.compile:
        variants["bf16 channels_last compiled"] = (torch.channels_last, torch.bfloat16, True)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {args.size} px, batch {args.batch}")
    for spec in args.models:
        name, _, width = spec.partition(":")
        timed = {v: images_per_second(name, width=int(width or 0), size=args.size, batch=args.batch, steps=args.steps,
                                      repeats=args.repeats, memory_format=mf, amp=amp, compile_=c)
                 for v, (mf, amp, c) in variants.items()}
        base = timed["fp32"][0]
        print(f"{spec:14s} " + "  ".join(f"{v}: {r:7.1f} img/s ({r / base:.2f}x)" for v, (r, _) in timed.items()))
        if args.compile:
            print(f"{'':14s} first compiled step (the compile): {timed['bf16 channels_last compiled'][1]:.1f} s")


if __name__ == "__main__":
    main()
