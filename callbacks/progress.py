"""Progress: lines for long evaluations whose progress bar is off (logs redirected to a file), and one bar over
the steps of a stage trained for a number of steps."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from typing_extensions import override

__all__ = ["ProgressLog", "StepProgressBar"]

log = logging.getLogger(__name__)


class ProgressLog(Callback):
    """Logs each finished test batch with the elapsed time and an estimate of the time left, when the
    progress bar is off (``--trainer.enable_progress_bar false``, or logs redirected to a file)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._start = time.monotonic()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.progress_bar_callback is not None or not trainer.is_global_zero:
            return
        done, total = batch_idx + 1, trainer.num_test_batches[0]
        elapsed = time.monotonic() - self._start
        log.info("%s: batch %d/%d (%.0f s, about %.0f s left)", self.label, done, total, elapsed,
                 elapsed / max(done, 1) * (total - done))


class StepProgressBar(TQDMProgressBar):
    """One bar over a fit's ``max_steps`` (from the resumed step on) instead of one bar per epoch.

    For the kernel stage, whose full-batch epochs are single steps and whose epochs are unbounded
    (``max_epochs=-1``): Lightning's bars would show one-step epochs numbered against ``-2``.
    """

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = bar.initial = trainer.global_step
        bar.set_description("Steps")
        bar.refresh()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """The bar spans the epochs: nothing to reset."""

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._should_update(step, self.train_progress_bar.total):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The bar closes when training ends, not with each epoch."""
