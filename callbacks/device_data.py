"""Move a Trainer's in-memory training batches to the module's device when training starts."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from datamodules.device_batches import DeviceBatches

__all__ = ["BatchesOnDevice"]


class BatchesOnDevice(Callback):
    """Moves a :class:`~datamodules.device_batches.DeviceBatches` training loader to the module's device once the
    Trainer has placed the module there, so every batch is drawn and augmented on that device (other loaders are
    left alone: Lightning copies their batches)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, DeviceBatches):
            loader.to(pl_module.device)
