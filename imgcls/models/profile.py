"""What each registered model costs (`imgcls models`): parameters, forward FLOPs per image at a few
input sizes (torch's FlopCounterMode: 2 FLOPs per multiply-add), and training images/s measured here
with the settings a run would use (amp, channels_last)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from imgcls.models.registry import _MODELS, create_model
from imgcls.recipes import batch_for


@dataclass
class ModelProfile:
    name: str
    summary: str  # the first line of the factory's docstring
    params: int
    gflops: dict[int, float] = field(default_factory=dict)  # input px -> forward GFLOPs per image
    train_images_per_second: dict[int, float] = field(default_factory=dict)  # input px -> measured
    train_batch: dict[int, int] = field(default_factory=dict)  # input px -> the batch it was measured at


def forward_gflops(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def train_speed(model: torch.nn.Module, size: int, *, hw, batch: int = 32, steps: int = 3,
                num_classes: int = 10) -> float:
    """Training images/s: forward, loss, backward and an SGD step on random images (the model step
    of a run: the data path adds little, see benchmarks/pipeline.py)."""
    model.to(hw.device, memory_format=hw.memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=hw.device).contiguous(memory_format=hw.memory_format)
    y = torch.randint(0, num_classes, (batch,), device=hw.device)

    def step() -> None:
        with hw.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # kernels are set up on the first step
    if hw.device.type == "cuda":
        torch.cuda.synchronize(hw.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if hw.device.type == "cuda":
        torch.cuda.synchronize(hw.device)  # the clock means nothing until the GPU is done
    return batch * steps / (time.perf_counter() - t0)


def profile(names: list[str] | None = None, *, sizes: tuple[int, ...] = (64, 128), hw=None,
            batch: int | None = None) -> list[ModelProfile]:
    """One ModelProfile per registered model (or per name); `hw`: measure training speed on it, at `batch`
    or (None) at the batch a run with that image_size trains with (recipes.batch_for)."""
    out = []
    for name in names or sorted(_MODELS):
        model = create_model(name, 10)
        doc = (_MODELS[name].__doc__ or "").strip().splitlines() if name in _MODELS else []
        p = ModelProfile(name, doc[0] if doc else "", sum(t.numel() for t in model.parameters()))
        for size in sizes:
            p.gflops[size] = forward_gflops(model, size)
            if hw is not None:
                p.train_batch[size] = batch or batch_for(size)
                p.train_images_per_second[size] = train_speed(create_model(name, 10), size, hw=hw,
                                                              batch=p.train_batch[size])
        out.append(p)
    return out
