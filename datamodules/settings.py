"""The data section of a run: which dataset, its DAD splits and its loaders (one schema, one check)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["DataSettings", "DatasetName"]

DatasetName = Literal["digits", "cifar10", "cifar100", "svhn", "imagefolder", "synthetic"]


@dataclass(frozen=True)
class DataSettings:
    """The dataset and its DAD splits (see :mod:`datamodules.base`); the defaults are the embedded digits setup.

    Attributes:
        dataset: the data module (:data:`datamodules.registry.DATAMODULES`).
        root: the data folder (every dataset but ``digits``); nothing is downloaded unless ``download``.
        download: let torchvision download the files into ``root`` (needs internet).
        mmd_per_class: images per class in the MMD set (the paper: 50).
        val_size: clean held-out images for model selection (and calibration without a calibration split).
        test_size: if > 0, carve a test split of this size from the training data (datasets without one).
        calibration_size: if > 0, a clean split of this size for the detector's thresholds only.
        calibration_from: the pool the calibration split is carved from: ``train``, or the dataset's own
            ``test`` pool (then evaluated on the rest): images a pre-trained feature extractor never saw.
        selection_size: if > 0, a clean split of this size for the defense stage's choice of route only
            (``defense.select``), carved from the training pool.
        denoiser_size: cap the denoiser split (its AEs cost the most); the remaining training images train
            the classifier only. None: every training image not held out.
        subset: keep only the first ``subset`` images of each pool (tiny runs and tests).
        batch_size: batch size of the classifier's loaders, per process.
        num_workers: data-loader workers.
        options: the data module's own options (e.g. ``max_per_class``, ``image_size`` for ``imagefolder``).
    """

    dataset: DatasetName = "digits"
    root: str | None = None
    download: bool = False
    mmd_per_class: int = 20
    val_size: int = 500
    test_size: int = 450
    calibration_size: int = 0
    calibration_from: Literal["train", "test"] = "train"
    selection_size: int = 0
    denoiser_size: int | None = None
    subset: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("mmd_per_class", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected `data.{name}` >= 1, got {getattr(self, name)}")
        if self.val_size < 2:
            raise ValueError(f"Expected `data.val_size` >= 2, got {self.val_size}")
        for name in ("test_size", "calibration_size", "selection_size", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"Expected `data.{name}` >= 0, got {getattr(self, name)}")
        if self.denoiser_size is not None and self.denoiser_size < 1:
            raise ValueError(f"Expected `data.denoiser_size` >= 1, got {self.denoiser_size}")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"Expected `data.subset` >= 1, got {self.subset}")
