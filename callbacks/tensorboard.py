"""TensorBoard visualisations: image grids of the denoiser, histograms of the detector's scores."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid

__all__ = ["DenoiserImageLogger", "DetectionHistogramLogger"]


def _experiment(trainer: pl.Trainer):  # type: ignore[no-untyped-def]
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class DenoiserImageLogger(Callback):
    """After each validation epoch: a grid of clean / adversarial / denoised images (one row each).

    Args:
        clean, adv: a few fixed validation images and their AEs.
    """

    def __init__(self, clean: Tensor, adv: Tensor) -> None:
        self.clean = clean
        self.adv = adv

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = _experiment(trainer)
        if writer is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        adv = self.adv.to(pl_module.device)
        denoised = pl_module.purify(adv).cpu()
        rows = torch.cat([self.clean, self.adv, denoised])
        grid = make_grid(rows, nrow=len(self.clean), padding=1)
        writer.add_image("images/clean_adv_denoised", grid, global_step=trainer.global_step)


class DetectionHistogramLogger(Callback):
    """After testing a DADModule: histograms of the batch MMD scores, clean vs each attack."""

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = _experiment(trainer)
        if writer is None or not trainer.is_global_zero:
            return
        for name, scores in pl_module.scores.items():
            if scores:
                writer.add_histogram(f"detection/mmd_{name}", torch.cat(scores), global_step=trainer.global_step)
