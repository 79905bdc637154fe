"""TensorBoard logging for `tensorboard=true`: its own home, so the training loop needs nothing of the report."""
from __future__ import annotations

from pathlib import Path

from imgcls.errors import UserError


class TensorBoard:
    """`tensorboard=true`: each epoch's metrics.jsonl scalars as TensorBoard events in RUN/tensorboard/
    (`tensorboard --logdir RUN`). The writer is flushed every epoch, so a killed run keeps its curves."""

    TAGS = {"loss/train": "train_loss", "loss/val": "val_loss", "accuracy/train": "train_acc",
            "accuracy/val": "val_acc", "lr": "lr", "images_per_second": "images_per_second",
            "seconds/epoch": "seconds"}

    def __init__(self, run_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("tensorboard=true needs the tensorboard package: pip install tensorboard (or "
                            "pip install 'imgcls[tensorboard]'), or drop tensorboard=true.") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, metrics: dict) -> None:
        for tag, key in self.TAGS.items():
            if key in metrics:
                self.writer.add_scalar(tag, metrics[key], metrics["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
