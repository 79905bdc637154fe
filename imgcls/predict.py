"""infer() returns logits; evaluation, test-time augmentation and ensembles build on it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from imgcls import augment, checkpoint, config
from imgcls.hardware import Hardware
from imgcls.models import create_model


def _batches(images, rows: np.ndarray, batch_size: int, device: torch.device):
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if isinstance(images, torch.Tensor):
            yield images[torch.as_tensor(chunk, device=images.device)].to(device, non_blocking=True)
        else:
            yield torch.from_numpy(np.ascontiguousarray(images[chunk])).to(device)


@torch.no_grad()
def infer(model: nn.Module, images, rows: np.ndarray, *, size: int, hw: Hardware, batch_size: int = 512,
          view=None) -> torch.Tensor:
    """Logits (float32, on the CPU) for cache rows, in the order of `rows`.

    view(images_u8) -> images in [0, 1]; default: the plain evaluation view (resize only)."""
    model.eval()
    view = view or (lambda x: augment.eval_views(x, size=size))
    memory_format = torch.channels_last if hw.channels_last else torch.contiguous_format
    out = []
    for batch in _batches(images, rows, batch_size, hw.device):
        x = augment.normalize(view(batch)).contiguous(memory_format=memory_format)
        with hw.autocast():
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, images, rows: np.ndarray, labels: np.ndarray, *, size: int, hw: Hardware,
             batch_size: int = 512) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, logits) on labelled rows."""
    logits = infer(model, images, rows, size=size, hw=hw, batch_size=batch_size)
    y = torch.as_tensor(labels[rows])
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item(), logits


@dataclass
class LoadedRun:
    path: Path
    cfg: config.Config
    classes: list[str]
    model: nn.Module


def load_run(run_dir: str | Path, *, weights: str = "best", hw: Hardware) -> LoadedRun:
    """A trained run directory -> its config and model with `best` (or `last`) weights on hw.device."""
    from imgcls.errors import UserError

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir} is not an imgcls run directory (no config.yaml / manifest.json).")
    cfg = config.resolve(file=run_dir / "config.yaml")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    classes = manifest["classes"]
    model = create_model(cfg.model.model, len(classes), width=cfg.model.width, dropout=cfg.model.dropout)
    checkpoint.load_weights(model, run_dir / f"{weights}.safetensors")
    memory_format = torch.channels_last if hw.channels_last else torch.contiguous_format
    model.to(hw.device, memory_format=memory_format).eval()
    return LoadedRun(run_dir, cfg, classes, model)


def save_probs(path: Path, *, ids: list[str], classes: list[str], logits: torch.Tensor,
               labels: np.ndarray | None = None) -> None:
    """Logits and probabilities with their sample ids and class names: nothing is matched by position."""
    arrays = dict(ids=np.array(ids), classes=np.array(classes), logits=logits.numpy(),
                  probs=torch.softmax(logits, 1).numpy())
    if labels is not None:
        arrays["labels"] = labels
    np.savez_compressed(path, **arrays)
