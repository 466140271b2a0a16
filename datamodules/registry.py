"""Dataset name -> data module, for the configuration's ``data.dataset``."""

from __future__ import annotations

from typing import Any

from datamodules.base import DADDataModule
from datamodules.digits import DigitsDataModule

__all__ = ["DATAMODULES", "build_datamodule"]

DATAMODULES: dict[str, type[DADDataModule]] = {"digits": DigitsDataModule}


def build_datamodule(cfg: Any, seed: int) -> DADDataModule:
    """Instantiate the data module named by ``cfg.dataset`` (a :class:`~lightning_modules.config.DataConfig`)."""
    if cfg.dataset not in DATAMODULES:
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; available: {sorted(DATAMODULES)}")
    common = dict(mmd_per_class=cfg.mmd_per_class, val_size=cfg.val_size, test_size=cfg.test_size, subset=cfg.subset,
                  batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=seed)
    extra: dict[str, Any] = dict(cfg.options)
    if cfg.dataset != "digits":
        extra.update(root=cfg.root, download=cfg.download)
    return DATAMODULES[cfg.dataset](**common, **extra)
