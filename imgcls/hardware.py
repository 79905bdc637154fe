"""Device, precision and memory-format choices, made once from the run settings."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from imgcls.config import RunConfig
from imgcls.errors import UserError


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None = full fp32
    channels_last: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)


def resolve(run: RunConfig) -> Hardware:
    if run.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA GPU is visible; use device=auto or device=cpu.")
    if run.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(run.device)
    if device.type == "cuda" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    # bf16 autocast: on by default on the GPU, and on CPUs with bf16 matrix instructions. There, with
    # channels_last, a train step at 64 px ran 3.1x (resnet18s), 2.2x (resnet18s width 16) and 1.5x
    # (tinycnn) the images/s of fp32 channels_last (2-core Xeon with AMX_BF16 + AVX512_BF16,
    # benchmarks/cpu_amp.py, issue 7). Without them it stays off (not measured there: amp=bf16 to try).
    amp = torch.bfloat16 if run.amp == "bf16" or (run.amp == "auto" and (device.type == "cuda" or native_bf16())) else None
    # channels_last: on with amp, and on the CPU in fp32 too, where oneDNN's NHWC convolutions are faster
    # (2-core AVX2 CPU, 64 px, train step: tinycnn +74%, resnet18s width 16 +39%, resnet9 width 16 +16%,
    # resnet18s width 64 +0%; tinycnn width 8 -3%; `imgcls train` with tinycnn +21% images/s; issue 7).
    channels_last = run.channels_last == "true" or (run.channels_last == "auto" and (amp is not None or device.type == "cpu"))
    return Hardware(device, amp, channels_last)


def native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512_BF16) for oneDNN's bf16 kernels."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g



def describe(device: str = "auto") -> str:
    """The device and precision a run with device= would use, in words (for printed figures)."""
    import platform

    hw = resolve(RunConfig(device=device))
    name = torch.cuda.get_device_name(hw.device) if hw.device.type == "cuda" else (
        f"{os.cpu_count()}-core CPU {platform.processor() or platform.machine()}")
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(hw.amp, "fp32")
    return f"{name}, {amp}{', channels_last' if hw.channels_last else ''}"
