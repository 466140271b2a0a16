"""scikit-learn's bundled digits: the embedded default data (1,797 images, 8x8, one channel)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor

from datamodules.base import DADDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(DADDataModule):
    """Digits with pixel values scaled from [0, 16] to [0, 1]; the test split is carved from the data
    (``test_size``, 450 by default)."""

    num_classes = 10
    image_shape = (1, 8, 8)

    def load(self) -> tuple[Tensor, Tensor, None, None]:
        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
        return images, torch.tensor(data.target, dtype=torch.long), None, None
