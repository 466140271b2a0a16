"""Exact mid-epoch resumption: the data position and the random state travel with the checkpoint."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from datamodules.sampling import ResumableSampler

__all__ = ["ResumeState"]

_KEY = "dad_resume"


class ResumeState(Callback):
    """Stores the global torch random state and the batches consumed in the current epoch.

    On resume, the random state is restored when training starts (after any sanity check) and the
    training loader's :class:`~datamodules.sampling.ResumableSampler` skips the consumed batches, so
    a run killed mid-epoch and resumed from ``last.ckpt`` continues exactly as the uninterrupted run.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[_KEY] = {
            "torch_rng": torch.get_rng_state(),
            "epoch": trainer.current_epoch,
            "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.ready,
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch_rng"])
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler) and state["epoch"] == trainer.current_epoch:
            sampler.skip_samples = state["batches_done"] * loader.batch_size
