"""CIFAR-10 and CIFAR-100 from torchvision's python-pickle files, held in memory as uint8.

Nothing is downloaded unless ``download=True``; without the files the data module fails with one line
naming the expected layout. The official test split is the ``test`` split unless ``test_size`` > 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100

from datamodules.base import DADDataModule, open_torchvision_dataset

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


def _as_tensors(data: np.ndarray, targets: list[int]) -> tuple[Tensor, Tensor]:
    """(N, H, W, C) uint8 pixels and labels -> (N, C, H, W) uint8 and int64 tensors."""
    return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(), torch.tensor(targets, dtype=torch.long)


class CIFAR10DataModule(DADDataModule):
    """CIFAR-10 (50,000 train / 10,000 test images, 32x32 RGB) with the DAD splits.

    ``settings.root`` is the folder holding ``cifar-10-batches-py/`` (the folder itself is accepted too);
    ``settings.download`` downloads the archive into it if it is missing (needs internet).
    """

    num_classes = 10
    image_shape = (3, 32, 32)
    name = "CIFAR-10"
    dataset_cls: type[CIFAR10] = CIFAR10
    files = "{data_batch_1..5,test_batch,batches.meta}"

    def _root(self) -> str | None:
        """``root``, or its parent when ``root`` is the batches folder itself."""
        root = self.settings.root
        if root is not None and Path(root).name == self.dataset_cls.base_folder:
            return str(Path(root).parent)
        return root

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        root = self._root()
        layout = f"{self.dataset_cls.base_folder}/{self.files}"
        download = self.settings.download
        train = open_torchvision_dataset(self.dataset_cls, self.name, root, download, layout, train=True)
        test = open_torchvision_dataset(self.dataset_cls, self.name, root, False, layout, train=False)
        return (*_as_tensors(train.data, train.targets), *_as_tensors(test.data, test.targets))


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels; 50,000 train / 10,000 test images, 32x32 RGB); arguments as CIFAR-10's."""

    num_classes = 100
    name = "CIFAR-100"
    dataset_cls = CIFAR100
    files = "{train,test,meta}"
