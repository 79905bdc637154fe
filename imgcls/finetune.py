"""Fine-tuning from a local pretrained file, where the rules allow it (issue 18; CSE 144 allows it,
food-11's rules forbid it): find a model's classifier ("the head"), load `init=PATH` with the head
re-initialised when its class count differs, give the backbone its own learning rate
(`lr_backbone=`), freeze it for the first `freeze_epochs=`, and feed the model the mean/std its
weights were trained with (`mean_std=`).

Nothing is downloaded: init= is a local safetensors file, and timm models are built with
pretrained=False (imgcls/models/timm_bridge.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from imgcls import augment, checkpoint
from imgcls.config import Config
from imgcls.errors import UserError

RULES = ("pretrained weights were used: food-11 (NTU ML2022 HW3) rules forbid them; pretrained=forbid refuses "
         "init= for such a competition")


def head_names(model: nn.Module) -> list[str]:
    """Module names of the classifier: timm's get_classifier() (a distilled model has two heads), else
    the model's last nn.Linear (the built-in models end in one)."""
    target = checkpoint.unwrap(model)
    get = getattr(target, "get_classifier", None)
    heads = get() if callable(get) else None
    heads = [h for h in (heads if isinstance(heads, (tuple, list)) else [heads])
             if isinstance(h, nn.Module) and any(True for _ in h.parameters())]
    if not heads:
        heads = [m for m in target.modules() if isinstance(m, nn.Linear)][-1:]
    if not heads:
        raise UserError(f"{type(target).__name__} has no classifier layer (nn.Linear) to re-initialise or to train "
                        "alone; lr_backbone= and freeze_epochs= need one.")
    names = {id(m): name for name, m in target.named_modules()}
    return [names[id(h)] for h in heads]


def head_parameters(model: nn.Module) -> set[str]:
    """Names (as in named_parameters()) of the classifier's parameters."""
    prefixes = tuple(f"{h}." for h in head_names(model))
    return {n for n, _ in checkpoint.unwrap(model).named_parameters() if n.startswith(prefixes)}


def load_init(model: nn.Module, path: str | Path) -> dict:
    """Load init=PATH into `model`. A classifier of another shape (1000 ImageNet classes, 100 here) is
    left as the model initialised it; any other mismatch is refused, as for every weights file.
    Returns what the manifest records: path, sha256, the head and what was re-initialised."""
    path = Path(path).expanduser()
    target = checkpoint.unwrap(model)
    heads = head_names(target)
    prefixes = tuple(f"{h}." for h in heads)
    head_keys = [k for k in target.state_dict() if k.startswith(prefixes)]
    fresh = checkpoint.load_weights(target, path, new_head=head_keys)
    shapes = checkpoint.tensor_shapes(path)
    weight = next((k for k in head_keys if k.endswith("weight")), None)
    return {"path": str(path.resolve()), "sha256": checkpoint.sha256(path), "head": heads,
            "reinitialised": fresh,
            "classes_in_file": shapes[weight][0] if weight in shapes and shapes[weight] else None,
            "note": RULES}


def init_line(info: dict, num_classes: int) -> str:
    """The one line that says what init= did with the classifier."""
    head = ", ".join(info["head"])
    if info["reinitialised"]:
        return (f"init: loaded {info['path']}; the classifier ({head}) is re-initialised: the file's has "
                f"{info['classes_in_file']} classes, this data {num_classes} ({', '.join(info['reinitialised'])})")
    return f"init: loaded {info['path']}, the classifier ({head}) included"


def param_groups(model: nn.Module, weight_decay: float, lr_backbone: float) -> list[dict]:
    """Optimizer groups for fine-tuning: the head's weights and norms/biases, then the backbone's with
    `lr_scale` = lr_backbone (optim.set_lr multiplies the scheduled lr by it). Weights decay, norms
    and biases do not (as optim.param_groups); empty groups are left out."""
    head = head_parameters(model)
    named = list(checkpoint.unwrap(model).named_parameters())
    groups = []
    for in_head, scale in ((True, 1.0), (False, lr_backbone)):
        for decays in (True, False):
            params = [p for n, p in named if (n in head) == in_head and (p.ndim > 1) == decays]
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale})
    return groups


def set_frozen(model: nn.Module, frozen: bool) -> None:
    """freeze_epochs=: the backbone takes no gradient (and the optimizer skips it) while frozen; its
    BatchNorm statistics still follow the new data, as fastai's freeze (train_bn=True) does."""
    head = head_parameters(model)
    for name, p in checkpoint.unwrap(model).named_parameters():
        p.requires_grad_(name in head or not frozen)


# --- input normalization -------------------------------------------------------------------------

def file_mean_std(path: Path) -> tuple[list[float], list[float]] | None:
    """mean/std from the config.json that timm's save_pretrained / the Hugging Face hub put beside
    model.safetensors ({"pretrained_cfg": {"mean": [...], "std": [...]}}), if there is one."""
    cfg_file = Path(path).expanduser().parent / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        pcfg = json.loads(cfg_file.read_text()).get("pretrained_cfg") or {}
    except (json.JSONDecodeError, AttributeError):
        return None
    mean, std = pcfg.get("mean"), pcfg.get("std")
    return (list(mean), list(std)) if mean and std and len(mean) == len(std) == 3 else None


def mean_std(model: nn.Module, cfg: Config) -> dict | None:
    """The mean/std the model's input is normalized with, when not ImageNet's (augment.MEAN/STD):
    mean_std=model or auto with init=: the config.json beside the init file, else the timm model's own
    pretrained_cfg (what timm's weights for it were trained with). None: ImageNet's."""
    choice, init = cfg.model.mean_std, cfg.model.init
    if choice == "imagenet" or (choice == "auto" and not init):
        return None
    found = file_mean_std(Path(init)) if init else None
    source = f"{Path(init).expanduser().parent / 'config.json'}" if found else ""
    pcfg = getattr(checkpoint.unwrap(model), "pretrained_cfg", None) or {}
    if not found and pcfg.get("mean") and pcfg.get("std"):
        found, source = (list(pcfg["mean"]), list(pcfg["std"])), f"timm's pretrained_cfg of {cfg.model.model}"
    if not found:
        if choice == "model":
            raise UserError(f"mean_std=model: {cfg.model.model} has no mean/std of its own (only timm models have a "
                            "pretrained_cfg, or a config.json beside init=); use mean_std=imagenet.")
        return None
    return {"mean": [float(v) for v in found[0]], "std": [float(v) for v in found[1]], "source": source}


def renormalize(model: nn.Module, norm: dict | None) -> None:
    """Feed `model` inputs normalized with norm's mean/std. Every augmentation and view normalizes with
    ImageNet's (augment.MEAN/STD); a forward pre-hook maps that to the model's own: one per-channel
    multiply-add per batch, x * (STD / std) + (MEAN - mean) / std. The hook is not in the state dict,
    so weights files stay as they are; inference.load_run adds it again from the run's config."""
    if not norm or (tuple(norm["mean"]), tuple(norm["std"])) == (augment.MEAN, augment.STD):
        return
    scale = torch.tensor([a / b for a, b in zip(augment.STD, norm["std"])]).view(1, 3, 1, 1)
    shift = torch.tensor([(a - m) / s for a, m, s in zip(augment.MEAN, norm["mean"], norm["std"])]).view(1, 3, 1, 1)

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x * scale.to(x.device, x.dtype) + shift.to(x.device, x.dtype), *args[1:])
    checkpoint.unwrap(model).register_forward_pre_hook(hook)
