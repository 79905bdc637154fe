"""Device, precision and memory-format choices, made once from the run settings, and the refusal of a
GPU this torch build has no kernels for (issue 17)."""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import numpy as np
import torch

from imgcls.config import RunConfig
from imgcls.errors import UserError

# Compute capabilities below Volta whose fp16 arithmetic runs at least as fast as fp32: CUDA C++
# Programming Guide, "Arithmetic Instructions" throughput table (results per clock per SM, fp16 vs
# fp32): 5.3 256 vs 128, 6.0 (P100, GP100) 128 vs 64 (also the P100 whitepaper: 21.2 fp16 vs
# 10.6 fp32 TFLOPS), 6.2 256 vs 128; consumer Pascal 6.1 (GTX 10x0, P4, P40) runs fp16 at 2 vs 128,
# 1/64 of fp32, so amp=auto stays off there.
FAST_FP16_BEFORE_VOLTA = {(5, 3), (6, 0), (6, 2)}
TRITON_MIN_CAPABILITY = (7, 0)  # torch._inductor.exc.GPUTooOldForTriton: "Triton only supports devices of CUDA Capability >= 7.0"
# CUDA 12.6 wheels are the newest that still carry sm_50/sm_60/sm_70 kernels (torch 2.14's
# torch.cuda.PYTORCH_RELEASES_CODE_CC: 12.6 x86_64 = 50, 60, 70, 75, 80, 86, 90; 13.0 starts at 75).
OLD_GPU_INDEX = "https://download.pytorch.org/whl/cu126"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]}, {self.sm})"


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None = full fp32
    channels_last: bool
    compile: bool = False  # torch.compile the training step (compile=true where it can run)
    notes: tuple[str, ...] = ()  # one line each on a setting changed or slow on this device; the API logs them

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16, whose gradients underflow without it (torch.amp docs, "Gradient
        Scaling"); it skips a step whose gradients overflow and halves the scale. Disabled for bf16
        and fp32 (same exponent range as fp32): then scale(), step() and update() pass through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)


def resolve(run: RunConfig) -> Hardware:
    """The device, precision and memory format a run uses. Raises UserError for a GPU this torch
    build cannot run, before anything is decoded or trained."""
    device = pick_device(run.device)
    gpu = gpu_of(device)
    if gpu:
        check_arch(gpu)
    amp = AMP_DTYPES.get(run.amp) if run.amp != "auto" else auto_amp(gpu)
    notes = [note for note in (precision_note(run.amp, gpu),) if note]
    # channels_last: on with amp, and on the CPU in fp32 too, where oneDNN's NHWC convolutions are faster
    # (2-core AVX2 CPU, 64 px, train step: tinycnn +74%, resnet18s width 16 +39%, resnet9 width 16 +16%,
    # resnet18s width 64 +0%; tinycnn width 8 -3%; `imgcls train` with tinycnn +21% images/s; issue 7).
    channels_last = run.channels_last == "true" or (run.channels_last == "auto" and (amp is not None or device.type == "cpu"))
    compile_ = run.compile
    if compile_ and gpu and gpu.capability < TRITON_MIN_CAPABILITY:
        compile_ = False
        notes.append(f"compile=true: torch.compile's GPU backend (Triton) needs compute capability 7.0 or newer and "
                     f"{gpu.name} has {gpu.capability[0]}.{gpu.capability[1]}, so the model runs eager (uncompiled).")
    return Hardware(device, amp, channels_last, compile_, tuple(notes))


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA GPU is visible; use device=auto or device=cpu.")
    if setting == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(setting)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: this process's own GPU
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def gpu_of(device: torch.device) -> Gpu | None:
    """The GPU `device` names; None on the CPU, and for a torchrun LOCAL_RANK beyond the GPUs there are
    (distributed.init says what to fix for that)."""
    index = device.index or 0
    if device.type != "cuda" or index >= torch.cuda.device_count():
        return None
    return Gpu(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def auto_amp(gpu: Gpu | None) -> torch.dtype | None:
    """amp=auto. GPU: bf16 from Ampere (8.0, native bf16 tensor cores) on; fp16 with loss scaling on
    Volta/Turing (7.x: fp16 tensor cores, bf16 only emulated) and where pre-Volta fp16 is fast (see
    FAST_FP16_BEFORE_VOLTA); else fp32. CPU: bf16 where native_bf16() says it is faster (a train step at
    64 px with channels_last ran 3.1x (resnet18s), 2.2x (resnet18s width 16) and 1.5x (tinycnn) the
    images/s of fp32 channels_last on a 2-core Xeon with AMX_BF16, benchmarks/cpu_amp.py, issue 7);
    elsewhere fp32 (amp=bf16 to try)."""
    if gpu is None:
        return torch.bfloat16 if native_bf16() else None
    if gpu.capability >= (8, 0):
        return torch.bfloat16
    if gpu.capability >= (7, 0) or gpu.capability in FAST_FP16_BEFORE_VOLTA:
        return torch.float16
    return None


def amp_name(dtype: torch.dtype | None) -> str:
    """A training precision in words: bf16, fp16, or fp32 (no autocast)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def precision_note(setting: str, gpu: Gpu | None) -> str | None:
    """A line when amp= asks a GPU or the CPU for a precision it runs slowly."""
    if setting == "auto" or AMP_DTYPES[setting] is None:
        return None
    auto = auto_amp(gpu)
    if AMP_DTYPES[setting] == auto:
        return None
    auto_name = amp_name(auto)
    if gpu is None:  # fp16 has no fast CPU kernels (gpu_check's CPU run: 0.1x fp32); bf16: native_bf16()
        why = ("bf16 needs AMX, or AVX512_BF16 on an AMD CPU, to beat fp32 (BENCHMARKS.md)" if setting == "bf16"
               else "CPUs have no fast fp16 arithmetic")
        return f"amp={setting} on this CPU: {why}; amp=auto ({auto_name} here) is likely faster."
    if setting == "bf16" and gpu.capability < (8, 0):
        return (f"amp=bf16 on {gpu.describe()}: bf16 is native from compute capability 8.0, so here it is emulated "
                f"and slow; amp=auto picks {auto_name} on this GPU.")
    if setting == "fp16" and auto is None:
        return (f"amp=fp16 on {gpu.describe()}: this GPU runs fp16 arithmetic at a small fraction of its fp32 rate; "
                "amp=auto (fp32 here) is likely faster.")
    return None


def runs_here(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build whose torch.cuda.get_arch_list() is `arch_list` has code a GPU of
    `capability` can run. CUDA C++ Programming Guide, "Binary Compatibility": a cubin for X.y runs
    on X.z with z >= y only; PTX (compute_XY) is compiled by the driver for any later capability;
    an architecture-specific target (sm_90a) runs on exactly that capability."""
    major, minor = capability
    cc = 10 * major + minor
    for arch in arch_list:
        kind, _, code = arch.partition("_")
        digits = code.rstrip("af")
        if not digits.isdigit():
            continue
        v = int(digits)
        if kind == "compute" and cc >= v:
            return True
        if kind == "sm" and (cc == v if code.endswith("a") else (major == v // 10 and cc >= v)):
            return True
    return False


def check_arch(gpu: Gpu) -> None:
    """Refuse a GPU the installed torch has no kernels for: torch.cuda.is_available() is True there,
    and the first CUDA operation fails with cudaErrorNoKernelImageForDevice (a P100, sm_60, under
    the cu128 torch of Kaggle's default image: Kaggle/kaggle-cli#1151)."""
    archs = torch.cuda.get_arch_list()
    if not torch.version.cuda or not archs or runs_here(gpu.capability, archs):
        return  # ROCm, or a build that does not list its architectures: torch reports what it finds
    base = torch.__version__.split("+")[0]
    if gpu.capability < (7, 5):
        build = (f"the CUDA 12.6 wheels still have kernels for it: pip install torch=={base} torchvision "
                 f"--index-url {OLD_GPU_INDEX}")
    else:
        build = "a newer torch release or nightly, see https://pytorch.org/get-started/locally/"
    raise UserError(
        f"This PyTorch cannot run on {gpu.describe()}: torch {torch.__version__} has kernels for "
        f"{', '.join(archs)} only, so its first CUDA operation would fail with \"no kernel image is available for "
        f"execution on the device\". Fix it one of three ways: choose a supported GPU (on Kaggle: the notebook's "
        f"Accelerator setting, GPU T4 x2; on Colab: Runtime > Change runtime type > T4 GPU); install a torch build for "
        f"{gpu.sm} ({build}); or train on the CPU with device=cpu.")


def native_bf16() -> bool:
    """Whether bf16 autocast trains faster than fp32 on this CPU: with AMX, or with AVX512_BF16 on an AMD
    CPU (Zen 4: 2.6x fp32 channels_last). AVX512_BF16 without AMX on an Intel CPU ran slower than fp32
    channels_last (2-core Xeon whose VM hides AMX, resnet18d train step: 0.75x at 128 px, 0.76x at 64 px;
    `imgcls train` 1.2x longer; benchmarks/cpu_amp.py, BENCHMARKS.md), so there it is fp32."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("amx_bf16") or (caps.get("avx512_bf16") and cpu_vendor() != "GenuineIntel"))


def cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in platform.processor()), "")  # Windows says it here


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


CACHE_SHARE_OF_FREE = 0.4  # the image cache goes on the GPU when it takes under this share of the free memory


def cache_on_gpu(nbytes: int, hw: Hardware, setting: str) -> bool:
    """Whether the decoded image cache is kept on the GPU (airbench-style: no copy per batch): data_on_device=
    true, or auto and it leaves most of the free memory to the model and activations."""
    if hw.device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(hw.device)
    return setting == "true" or (setting == "auto" and nbytes < CACHE_SHARE_OF_FREE * free)


def place_cache(images: np.ndarray, hw: Hardware, setting: str) -> torch.Tensor:
    """The whole cache as a tensor: on the GPU when it fits (cache_on_gpu), else in RAM (pinned for a GPU)."""
    tensor = torch.from_numpy(np.array(images))  # one read of the memory-mapped file into RAM
    if hw.device.type != "cuda":
        return tensor
    return tensor.to(hw.device) if cache_on_gpu(tensor.numel(), hw, setting) else tensor.pin_memory()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def describe(hw: Hardware | str = "auto") -> str:
    """The device, precision and memory format of `hw` (or of a run with device=`hw`), in words."""
    hw = resolve(RunConfig(device=hw)) if isinstance(hw, str) else hw
    return f"{device_name(hw.device)}, {amp_name(hw.amp)}{', channels_last' if hw.channels_last else ''}"
