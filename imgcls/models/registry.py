"""The model registry: the one piece of module-level mutable state (STYLE.md)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from imgcls.errors import UserError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a factory `fn(num_classes, *, width, dropout) -> nn.Module` under its name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, num_classes: int, *, width: int = 0, dropout: float = 0.0) -> nn.Module:
    """A built-in model by name, or any timm model as `timm:<name>` (never with pretrained weights)."""
    if name.startswith("timm:"):
        from imgcls.models.timm_bridge import create_timm
        return create_timm(name[5:], num_classes, dropout=dropout)
    if name not in _MODELS:
        raise UserError(f"Unknown model {name!r}. Built-in models: {', '.join(list_models())}; "
                        "or any timm model as timm:<name> (e.g. model=timm:resnet18).")
    kwargs = {"width": width} if width else {}  # 0 = the family's own default width
    return _MODELS[name](num_classes, dropout=dropout, **kwargs)
