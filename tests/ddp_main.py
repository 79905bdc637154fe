"""`python -m imgcls`, plus a BatchNorm-free model, for tests/test_distributed.py. Run as
`torchrun --nproc_per_node 2 tests/ddp_main.py train ...` or `python tests/ddp_main.py train ...`.

Without sync_bn (which needs CUDA) every rank normalizes over its own half of the batch, so a
BatchNorm model on 2 CPU ranks is not the same function as on one process; without BatchNorm the
2-rank update equals the 1-process update up to float rounding, which is what the test checks."""
import sys

import torch.nn as nn

from imgcls import cli
from imgcls.models import register_model


@register_model
def nobn(num_classes: int, *, width: int = 8, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width, num_classes))


if __name__ == "__main__":
    sys.exit(cli.main())
