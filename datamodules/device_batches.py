"""Training batches of in-memory images, drawn and augmented on the device that holds them.

A ``DataLoader`` over in-memory images pays per sample in Python (indexing, collating) and copies every batch to
the accelerator: at GPU speed that is the bottleneck (the classifier stage trained at 0.32 of a bare loop on one
H200). Here the images, uint8 as stored (150 MB for CIFAR-10's training set), are moved once to the training
device (:meth:`DeviceBatches.to`, called by :class:`callbacks.device_data.BatchesOnDevice` when training starts);
each batch is a slice of the epoch's order, gathered, cropped and flipped there
(:meth:`~datamodules.augment.FlipCrop.batch`, its draws from that device's generator) and scaled to [0, 1]: no
per-batch host work and no host synchronisation. The order is the
:class:`~datamodules.sampling.ResumableSampler`'s (shuffled by ``(seed, epoch)``, sharded by rank, resumable
mid-epoch), so on the CPU the batches are exactly those of the ``DataLoader`` it replaces.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from datamodules.augment import FlipCrop, to_float
from datamodules.sampling import ResumableSampler

__all__ = ["DeviceBatches", "DEVICE_SHARE"]

log = logging.getLogger(__name__)

DEVICE_SHARE = 0.25
"""The images move to a GPU only if they take at most this share of its free memory (else batches are copied)."""


class DeviceBatches:
    """Shuffled ``(images, labels)`` training batches of ``batch_size`` (the last one may be smaller), float32 in
    [0, 1], augmented by ``augment``; made on the device the data were moved to.

    Args:
        images: the training images ``(N, C, H, W)``, uint8 or float in [0, 1].
        labels: their labels ``(N,)``.
        batch_size: images per batch and process.
        seed: seed of the shuffling.
        augment: crop and flip settings, or None.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, seed: int = 0,
                 augment: FlipCrop | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, got {batch_size}")
        if len(images) != len(labels):
            raise ValueError(f"Expected as many labels as images, got {len(labels)} and {len(images)}")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.augment = augment
        self.sampler = ResumableSampler(len(labels), shuffle=True, seed=seed, pad=True)

    @property
    def num_samples(self) -> int:
        """The images of the training set (before any padding across ranks)."""
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> DeviceBatches:
        """Move the images and labels to ``device`` (in place), unless they do not fit a GPU's free memory."""
        device = torch.device(device)
        if device == self.images.device:
            return self
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            size = self.images.nbytes + self.labels.nbytes
            if size > DEVICE_SHARE * free:
                log.info("training images (%.0f MB) kept in host memory: more than %.0f%% of %s's free %.0f MB",
                         size / 2**20, 100 * DEVICE_SHARE, device, free / 2**20)
                return self
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long, device=self.device)  # one copy per epoch
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            images = self.images[rows]
            yield (self.augment.batch(images) if self.augment is not None else to_float(images)), self.labels[rows]
