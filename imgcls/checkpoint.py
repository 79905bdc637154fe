"""Checkpoints that cannot run code when loaded, written atomically.

Weights: safetensors (`best.safetensors`, `last.safetensors`). Training state for resume
(optimizer, EMA, generators, counters): `state.pt`, read only with torch.load(weights_only=True),
which refuses any pickle that would build arbitrary objects.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from imgcls.errors import UserError


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)  # a reader never sees half a file, and a crash keeps the previous one
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == 28:  # ENOSPC
            raise UserError(f"The disk is full while writing {path}. Free space there or choose another --out.") from None
        raise


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile / AveragedModel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, torch.optim.swa_utils.AveragedModel)):
            model = model.module
        else:
            return model


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {}))


def load_weights(model: nn.Module, path: Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Weights file {path} does not exist.")
    if path.suffix != ".safetensors":
        raise UserError(f"{path} is not a .safetensors file. imgcls loads weights only from safetensors, which "
                        "cannot run code; convert it with safetensors.torch.save_file(state_dict, 'weights.safetensors').")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a malformed header
        raise UserError(f"{path} is not a valid safetensors file: {e}") from None
    target = unwrap(model)
    missing, unexpected = [], []
    own = target.state_dict()
    for k in own:
        if k not in tensors:
            missing.append(k)
        elif tensors[k].shape != own[k].shape:
            raise UserError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)} but the model expects "
                            f"{tuple(own[k].shape)}; were these weights made for another model or class count?")
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise UserError(f"{path} does not match the model: {len(missing)} missing tensor(s) "
                        f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}).")
    target.load_state_dict(tensors)


def save_state(state: dict, path: Path) -> None:
    _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"No training state at {path}: is this a run directory written by imgcls train?") from None
    except Exception as e:  # UnpicklingError for a pickle that would build arbitrary objects, and the like
        raise UserError(f"Refused to load {path}: it is not a plain tensor checkpoint and may run code when "
                        f"unpickled ({type(e).__name__}). Nothing from it was executed.") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
