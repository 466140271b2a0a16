"""An exponential moving average of the weights that starts part-way through training.

Lightning's :class:`~pytorch_lightning.callbacks.EMAWeightAveraging` averages from the first step, so a short
run's average keeps a share ``decay ** steps`` of the random initial weights (7% after 2,660 steps at 0.999),
and it validates and checkpoints the average even before any update, i.e. the initial weights. Here the
average starts at a fraction of the training steps (its first update copies the weights then, as
:class:`torch.optim.swa_utils.AveragedModel` does), and until then the live weights are validated and saved.
The average lives on the module's device (Lightning's callback builds it in ``setup``, before the module is
moved, which would leave it on the CPU and copy every weight across at every step), and its update reads
nothing back to the host (:class:`torch.optim.swa_utils.AveragedModel` compares its update count, a tensor,
at every step).

Averaged weights are never the weights the running batch-norm statistics were gathered with:
:class:`BatchNormRefresh` recomputes them on the Trainer's device before a validation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging

__all__ = ["DelayedEMA", "BatchNormRefresh"]


class DelayedEMA(EMAWeightAveraging):
    """EMA of the weights (and buffers) with ``decay``, updated every step from ``start`` of the training steps on.

    Args:
        decay: the average's decay per step.
        start: the share of ``trainer.estimated_stepping_batches`` after which averaging begins, in [0, 1).
    """

    def __init__(self, decay: float, start: float = 0.5) -> None:
        if not 0.0 <= start < 1.0:
            raise ValueError(f"Expected the averaging start in [0, 1), got {start}")
        super().__init__(decay=decay)
        self.decay = decay
        self.start = start
        self._updates: int | None = None  # the average's update count on the host, read at the first update

    @property
    def averaging(self) -> bool:
        """Whether the average holds at least one update (before that it is the initial weights)."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._device = trainer.strategy.root_device  # where the strategy is about to move the module
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.update_starting_at_step = int(self.start * trainer.estimated_stepping_batches)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Update the average as :class:`~torch.optim.swa_utils.AveragedModel` does (a copy first, then
        ``decay * average + (1 - decay) * weights``), with its update count kept on the host."""
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def _update(self, pl_module: pl.LightningModule) -> None:
        average = self._average_model
        assert average is not None
        if self._updates is None:
            self._updates = int(average.n_averaged)  # restored from a checkpoint when resuming
        pairs = zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                    itertools.chain(pl_module.parameters(), pl_module.buffers()))
        for averaged, current in pairs:
            current = current.detach().to(averaged.device)
            averaged.copy_(current if self._updates == 0 else self.decay * averaged + (1 - self.decay) * current)
        average.n_averaged += 1
        self._updates += 1

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaging:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaging:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.averaging:  # otherwise the live weights are the state (and resuming restarts nothing)
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaging:
            super().on_train_end(trainer, pl_module)


class BatchNormRefresh(Callback):
    """Recompute the module's batch-norm running statistics on ``loader`` when a validation starts.

    One pass in train mode without gradients (:func:`torch.optim.swa_utils.update_bn`), on the module's device:
    the hook runs after the Trainer has moved the module, so the pass runs on the run's accelerator.

    Args:
        loader: ``(images, labels)`` batches (the training images, without augmentation).
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            torch.optim.swa_utils.update_bn(self.loader, pl_module, device=pl_module.device)
