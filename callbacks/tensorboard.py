"""TensorBoard visualisations: image grids of the denoiser, histograms of the detector's scores, figures."""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid

__all__ = ["DenoiserImageLogger", "DetectionHistogramLogger", "log_figures"]


def _experiment(trainer: pl.Trainer):  # type: ignore[no-untyped-def]
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class DenoiserImageLogger(Callback):
    """After each validation epoch: a grid of clean / adversarial / denoised images (one row each).

    The images are the first ``num_images`` validation pairs of the trainer's
    :class:`~datamodules.paired.PairedDataModule`.
    """

    def __init__(self, num_images: int = 8) -> None:
        self.num_images = num_images

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = _experiment(trainer)
        data = getattr(trainer, "datamodule", None)
        if writer is None or trainer.sanity_checking or not trainer.is_global_zero or data is None:
            return
        clean, adv, _ = (t[: self.num_images] for t in data.triples(data.val_split))
        denoised = pl_module.purify(adv.to(pl_module.device)).cpu()
        grid = make_grid(torch.cat([clean, adv, denoised]), nrow=len(clean), padding=1)
        writer.add_image("images/clean_adv_denoised", grid, global_step=trainer.global_step)


class DetectionHistogramLogger(Callback):
    """After testing a DefenseEvaluator: histograms of the batch MMD scores, clean vs each attack.

    ``pl_module.scores`` maps each name to a tensor of batch scores (or a list of them).
    """

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = _experiment(trainer)
        if writer is None or not trainer.is_global_zero:
            return
        for name, scores in pl_module.scores.items():
            values = torch.cat([s.reshape(-1) for s in scores]) if isinstance(scores, list) and scores else scores
            if isinstance(values, Tensor) and values.numel():
                writer.add_histogram(f"detection/mmd_{name}", values, global_step=trainer.global_step)


def log_figures(logger: TensorBoardLogger, figures: Mapping[str, Figure], step: int = 0) -> None:
    """Add matplotlib figures to a TensorBoard run (e.g. the evaluation's ROC and accuracy-vs-eps plots)."""
    for tag, fig in figures.items():
        logger.experiment.add_figure(tag, fig, global_step=step, close=False)
