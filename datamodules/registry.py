"""Dataset name -> data module, for the configuration's ``data.dataset``."""

from __future__ import annotations

import inspect
from typing import Any

from datamodules.base import DADDataModule
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.digits import DigitsDataModule
from datamodules.imagefolder import ImageFolderDataModule
from datamodules.svhn import SVHNDataModule

__all__ = ["DATAMODULES", "build_datamodule"]

DATAMODULES: dict[str, type[DADDataModule]] = {
    "digits": DigitsDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "svhn": SVHNDataModule,
    "imagefolder": ImageFolderDataModule,
}


def build_datamodule(cfg: Any, seed: int) -> DADDataModule:
    """Instantiate the data module named by ``cfg.dataset`` (a :class:`~lightning_modules.config.DataConfig`)."""
    if cfg.dataset not in DATAMODULES:
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; available: {sorted(DATAMODULES)}")
    common = dict(mmd_per_class=cfg.mmd_per_class, val_size=cfg.val_size, test_size=cfg.test_size,
                  calibration_size=cfg.calibration_size, subset=cfg.subset,
                  batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=seed)
    extra: dict[str, Any] = dict(cfg.options)
    cls = DATAMODULES[cfg.dataset]
    accepted = set(inspect.signature(cls).parameters) - set(common) - {"root", "download"}
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise ValueError(f"Unknown `data.options` {unknown} for {cfg.dataset!r}; accepted: {sorted(accepted)}")
    if cfg.dataset != "digits":
        extra.update(root=cfg.root, download=cfg.download)
    return cls(**common, **extra)
