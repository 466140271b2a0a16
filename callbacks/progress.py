"""Progress lines for long evaluations whose progress bar is off (logs redirected to a file)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

__all__ = ["ProgressLog"]

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
