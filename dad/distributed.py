"""Global statistics under DDP: gather a batch from every rank with gradients (pure ``torch.distributed``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_gather

__all__ = ["gather_global", "rank_and_world", "release_process_group"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_global(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks (rank order), keeping the autograd graph; ``t`` itself in one process.

    MMD is a U-statistic over all pairs of the global batch, so each rank builds the gram matrices of
    the whole batch. The gather's backward sums the gradients that reach each rank's own samples over
    the ranks; since every rank computes the same statistic, DDP's gradient averaging then yields
    exactly the single-process gradient. Every rank must hold a tensor of the same shape.
    """
    if rank_and_world()[1] == 1:
        return t
    return torch.cat(all_gather(t), dim=0)


def release_process_group() -> None:
    """Destroy the default process group, if any, before the interpreter exits: gloo's threads left to the
    interpreter's exit can abort it ("terminate called without an active exception") after a finished run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
