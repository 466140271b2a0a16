"""Global statistics under DDP: gather a batch from every rank with gradients."""

from __future__ import annotations

import pytorch_lightning as pl
from torch import Tensor

__all__ = ["gather_global"]


def gather_global(module: pl.LightningModule, t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks (rank order), keeping the autograd graph.

    MMD is a U-statistic over all pairs of the global batch, so each rank builds the gram matrices of
    the whole batch. With ``sync_grads=True`` the gradient that reaches each rank's own samples is the
    sum over ranks; since every rank computes the same statistic, DDP's gradient averaging then yields
    exactly the single-process gradient.
    """
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return t
    gathered = module.all_gather(t, sync_grads=True)
    return gathered.reshape(-1, *t.shape[1:])
