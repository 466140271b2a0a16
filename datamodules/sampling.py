"""A rank-aware, seeded sampler that can resume mid-epoch exactly.

Lightning replaces plain samplers with a ``DistributedSampler`` and, on resuming from a mid-epoch
checkpoint, restarts the epoch's data from its first batch. This sampler does both jobs itself: it
shuffles with a generator seeded by ``(seed, epoch)`` (the global random state is never touched),
shards the order over the ranks of a distributed run, and skips the batches a resumed run has
already consumed (set by :class:`callbacks.resume.ResumeState`). The trainer must then be built with
``use_distributed_sampler=False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from dad.distributed import rank_and_world

__all__ = ["ResumableSampler", "ShardedBatchSampler"]


class ResumableSampler(Sampler[int]):
    """Indices of one rank's share of the data, seeded per epoch, resumable mid-epoch.

    Args:
        length: the dataset's size.
        shuffle: shuffle each epoch (training) or keep the order (evaluation).
        seed: base seed of the shuffling.
        pad: repeat samples so every rank gets the same count (training needs equal step counts
            across ranks); evaluation leaves it off so no sample is counted twice.
    """

    def __init__(self, length: int, shuffle: bool, seed: int = 0, pad: bool = True) -> None:
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self.skip_samples = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        rank, world = rank_and_world()
        if self.pad and world > 1 and order:
            total = math.ceil(self.length / world) * world
            order = (order * math.ceil(total / len(order)))[:total]
        return order[rank::world]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()
        start, self.skip_samples = self.skip_samples, 0  # skipping applies to the resumed epoch only
        return iter(indices[start:])

    def __len__(self) -> int:
        return len(self._indices())


class ShardedBatchSampler(Sampler[list[int]]):
    """Consecutive batches of ``batch_size`` indices, whole batches dealt round-robin to the ranks.

    For evaluation: every sample is seen exactly once (no padding, unlike ``DistributedSampler``), and
    each batch is the same batch a single process would form, so batch-level detection and the
    per-batch seeds give the same results whatever the number of processes.
    """

    def __init__(self, length: int, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, got {batch_size}")
        self.length = length
        self.batch_size = batch_size

    def _batches(self) -> list[list[int]]:
        rank, world = rank_and_world()
        starts = range(rank * self.batch_size, self.length, world * self.batch_size)
        return [list(range(s, min(s + self.batch_size, self.length))) for s in starts]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
