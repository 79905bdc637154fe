"""Any timm model by name, always randomly initialised: pretrained weights are never fetched."""
from __future__ import annotations

import torch.nn as nn

from imgcls.errors import UserError


def create_timm(name: str, num_classes: int, *, dropout: float = 0.0) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise UserError(f"timm has no model named {name!r}; `python -c \"import timm; print(timm.list_models())\"` "
                        "lists them.")
    # pretrained=False is forced: competition rules forbid pretrained weights and nothing is downloaded.
    return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=dropout)
