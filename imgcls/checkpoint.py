"""Checkpoints that cannot run code when loaded, written atomically (tmpfiles.write_bytes).

Weights: safetensors (`best.safetensors`, `last.safetensors`). Training state for resume
(optimizer, EMA, generators, counters): `state.pt`, read only with torch.load(weights_only=True),
which refuses any pickle that would build arbitrary objects.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import safetensors.torch
from safetensors.torch import load_file

from imgcls import tmpfiles
from imgcls.errors import UserError


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
    tmpfiles.write_bytes(path, safetensors.torch.save(tensors, metadata=metadata or {}))


def load_weights(model: nn.Module, path: Path, *, new_head: list[str] = ()) -> list[str]:
    """Load a safetensors file into `model`; any tensor missing, unexpected or of another shape is refused.
    `new_head`: the classifier's keys (finetune.load_init), which may differ in shape (a file made for 1000
    classes) or be absent: then the whole classifier keeps the model's own initialisation. Returns the keys
    kept so."""
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
    own = target.state_dict()
    fresh = [k for k in new_head if k in own and (k not in tensors or tensors[k].shape != own[k].shape)]
    if fresh:  # a classifier of another class count (or none, a backbone's file): all of it stays as initialised
        fresh = [k for k in new_head if k in own]
        tensors = {k: v for k, v in tensors.items() if k not in new_head}
    missing = []
    for k in own:
        if k in fresh:
            continue
        if k not in tensors:
            missing.append(k)
        elif tensors[k].shape != own[k].shape:
            raise UserError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)} but the model expects "
                            f"{tuple(own[k].shape)}; were these weights made for another model or class count?")
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise UserError(f"{path} does not match the model: {len(missing)} missing tensor(s) "
                        f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}).")
    target.load_state_dict(tensors, strict=not fresh)
    return fresh


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header alone (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def save_state(state: dict, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmpfiles.write_bytes(path, buffer.getvalue())


STATE_KEYS = ("model", "optimizer", "epoch", "step")


def load_state(path: Path) -> dict:
    """state.pt -> dict of tensors and numbers. weights_only=True refuses any pickle that would
    build an object other than tensors and containers, before anything in it runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No training state at {path}: is this a run directory written by imgcls train?")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; the refusal is the news
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        called = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))  # the callable the pickle would run
        other = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))  # e.g. "Unsupported operand 149"
        reason = (f"it would call {called.group(1)}" if called else
                  f"the safe unpickler stopped at: {other.group(1).strip()}" if other else type(e).__name__)
        raise UserError(f"Refused to load {path}: it holds Python objects other than tensors, which could run "
                        f"code when unpickled ({reason}). Nothing from it was executed. Only load "
                        "checkpoints written by imgcls train.") from None
    except Exception as e:  # a truncated upload, a zip that is not a torch file, and the like
        raise UserError(f"{path} is damaged or not a torch checkpoint ({type(e).__name__}: {str(e)[:200]}). "
                        "Copy it again, or delete it to start the run from scratch.") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise UserError(f"{path} is not a training state written by imgcls train (it lacks "
                        f"{', '.join(k for k in STATE_KEYS if not isinstance(state, dict) or k not in state)}).")
    return state


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
