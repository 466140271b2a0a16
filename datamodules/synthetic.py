"""Synthetic class-conditional images: the shape of a real dataset without its files, for smoke runs and timings.

Where real data are absent (a GPU machine without the CIFAR-10 files, a quick check of a configuration), a run
still needs uint8 images of the right shape that a classifier can learn. Each class has a smooth random
colour pattern; an image is its class's pattern blended with a smooth pattern of its own and pixel noise,
quantised to uint8. Nothing measured on them says anything about a real dataset's accuracy or robustness: they
serve timings (``bench/gpu_check.py``) and tests.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from datamodules.base import DADDataModule, DataError
from datamodules.settings import DataSettings

__all__ = ["SyntheticDataModule", "synthetic_images"]


def _smooth(count: int, channels: int, size: int, generator: torch.Generator) -> Tensor:
    """``count`` smooth random patterns in [0, 1]: 4x4 noise upsampled bilinearly to ``size``."""
    coarse = torch.rand(count, channels, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def synthetic_images(num: int, num_classes: int, channels: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``num`` uint8 images ``(num, channels, size, size)`` and their labels, a pure function of ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    patterns = _smooth(num_classes, channels, size, generator)
    labels = torch.randint(0, num_classes, (num,), generator=generator)
    images = []
    for start in range(0, num, 4096):  # bounded float memory
        rows = labels[start:start + 4096]
        own = _smooth(len(rows), channels, size, generator)
        noise = torch.rand(len(rows), channels, size, size, generator=generator)
        images.append((0.6 * patterns[rows] + 0.25 * own + 0.15 * noise).mul_(255).round_().to(torch.uint8))
    return torch.cat(images), labels


class SyntheticDataModule(DADDataModule):
    """Synthetic uint8 images (see the module docstring); the test split is carved (``test_size``).

    Args:
        settings: the data section.
        seed: seed of the split (the images come from ``data_seed``).
        num_train: images in the pool the splits are carved from (50,000: CIFAR-10's training set).
        image_size: height and width (32: CIFAR).
        channels: colour channels.
        num_classes: classes.
        data_seed: seed of the images themselves.
    """

    def __init__(self, settings: DataSettings = DataSettings(), seed: int = 0, *, num_train: int = 50_000,
                 image_size: int = 32, channels: int = 3, num_classes: int = 10, data_seed: int = 0) -> None:
        super().__init__(settings, seed)
        for name, value in (("num_train", num_train), ("image_size", image_size), ("channels", channels)):
            if value < 1:
                raise DataError(f"Expected `data.options.{name}` >= 1, got {value}")
        if num_classes < 2:
            raise DataError(f"Expected `data.options.num_classes` >= 2, got {num_classes}")
        self.num_train, self.data_seed = num_train, data_seed
        self.num_classes = num_classes
        self.image_shape = (channels, image_size, image_size)

    def load(self) -> tuple[Tensor, Tensor, None, None]:
        channels, size, _ = self.image_shape
        images, labels = synthetic_images(self.num_train, self.num_classes, channels, size, self.data_seed)
        return images, labels, None, None
