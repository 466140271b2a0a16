"""SVHN (cropped digits, 32x32 RGB) from torchvision's ``.mat`` files, held in memory as uint8.

Nothing is downloaded unless ``download=True``; without the files the data module fails with one line
naming the expected layout. Labels are 0-9 (torchvision maps the files' label 10 to 0).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.datasets import SVHN

from datamodules.base import DADDataModule, open_torchvision_dataset
from datamodules.settings import DataSettings

__all__ = ["SVHNDataModule"]


class SVHNDataModule(DADDataModule):
    """SVHN (73,257 train / 26,032 test images; optionally the 531,131 ``extra`` ones) with the DAD splits.

    ``settings.root`` holds ``train_32x32.mat`` and ``test_32x32.mat`` (and ``extra_32x32.mat``);
    ``settings.download`` downloads the missing files into it (needs internet).

    Args:
        settings, seed: see :class:`~datamodules.base.DADDataModule`.
        extra: add the ``extra`` split to the training pool.
    """

    num_classes = 10
    image_shape = (3, 32, 32)

    def __init__(self, settings: DataSettings = DataSettings(), seed: int = 0, *, extra: bool = False) -> None:
        super().__init__(settings, seed)
        self.extra = extra

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        layout = "{train,test,extra}_32x32.mat" if self.extra else "{train,test}_32x32.mat"
        data = open_torchvision_dataset(SVHN, "SVHN", self.settings.root, self.settings.download, layout,
                                        split=split)
        return torch.from_numpy(data.data).contiguous(), torch.from_numpy(data.labels).long()

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        train_x, train_y = self._split("train")
        if self.extra:
            extra_x, extra_y = self._split("extra")
            train_x, train_y = torch.cat([train_x, extra_x]), torch.cat([train_y, extra_y])
        return train_x, train_y, *self._split("test")
