"""scikit-learn's bundled digits: the embedded default data (1,797 images, 8x8, one channel)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor

from datamodules.base import DADDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(DADDataModule):
    """Digits with pixel values scaled from [0, 16] to [0, 1]; the test split is carved from the data.

    Defaults: 20 images per class for the MMD set, 500 validation and 450 test images.
    """

    num_classes = 10
    image_shape = (1, 8, 8)

    def __init__(
        self,
        mmd_per_class: int = 20,
        val_size: int = 500,
        test_size: int = 450,
        calibration_size: int = 0,
        subset: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(mmd_per_class, val_size, test_size, calibration_size, subset, batch_size, num_workers, seed)

    def load(self) -> tuple[Tensor, Tensor, None, None]:
        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
        return images, torch.tensor(data.target, dtype=torch.long), None, None
