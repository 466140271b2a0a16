"""Dataset name -> data module, for the configuration's ``data.dataset``."""

from __future__ import annotations

import inspect
from datamodules.base import DADDataModule
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.digits import DigitsDataModule
from datamodules.imagefolder import ImageFolderDataModule
from datamodules.settings import DataSettings
from datamodules.svhn import SVHNDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = ["DATAMODULES", "build_datamodule"]

DATAMODULES: dict[str, type[DADDataModule]] = {
    "digits": DigitsDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "svhn": SVHNDataModule,
    "imagefolder": ImageFolderDataModule,
    "synthetic": SyntheticDataModule,
}


def build_datamodule(settings: DataSettings, seed: int) -> DADDataModule:
    """The data module named by ``settings.dataset``, with ``settings.options`` as its own keyword options."""
    if settings.dataset not in DATAMODULES:
        raise ValueError(f"Unknown dataset {settings.dataset!r}; available: {sorted(DATAMODULES)}")
    cls = DATAMODULES[settings.dataset]
    accepted = {name for name, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(settings.options) - accepted)
    if unknown:
        raise ValueError(f"Unknown `data.options` {unknown} for {settings.dataset!r}; accepted: {sorted(accepted)}")
    return cls(settings, seed, **settings.options)
