"""The base data module: images held in memory, and the DAD splits carved from a seed.

Splits (all disjoint):
- ``mmd``: N images per class from the training data (trains the MMD-OPT kernel; the reference set's source);
- ``denoiser``: the rest of the training data (trains the denoiser), or ``denoiser_size`` of it, the others
  (``extra``) then training the classifier only: a large training set for the classifier without paying for
  its adversarial examples;
- ``val``: clean held-out images (model selection; threshold calibration too unless there is a
  ``calibration`` split);
- ``calibration``: optional clean held-out images for the detector's thresholds only. Calibration needs no
  adversarial examples, so this pool can be large (its own sampling error moves the realised FPR) without the
  cost of attacking a large ``val``. It is carved from the training pool, or from the test pool
  (``calibration_from="test"``): a feature extractor pre-trained on the whole training set (the paper's phi on
  CIFAR-10, ImageNet) has seen every training image, and calibration images it has seen look more
  in-distribution than the test batches, which shifts the realised FPR;
- ``selection``: optional clean held-out images for the choice of route only (:mod:`dad.route_selection`);
- ``test``: the dataset's test split, or a held-out part of the data where there is none.
The classifier trains on ``mmd`` + ``denoiser`` + ``extra``. The indices are a pure function of the seed and are
saved in the run directory, so a resumed or later stage sees exactly the same split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dad.io import atomic_write_json
from datamodules.augment import FlipCrop, to_float
from datamodules.device_batches import DeviceBatches
from datamodules.sampling import ResumableSampler
from datamodules.settings import DataSettings

__all__ = ["DADDataModule", "ImageTensorDataset", "Splits", "DataError", "carve_splits", "open_torchvision_dataset"]

SPLIT_NAMES = ("mmd", "denoiser", "val", "calibration", "selection", "test", "extra")


class DataError(ValueError):
    """A dataset that cannot be used as configured (missing files, too few samples, bad labels)."""


@dataclass
class Splits:
    """Indices of each split; ``test`` indexes the test pool, ``calibration`` the pool ``calibration_from``
    names, the others the training pool."""

    mmd: list[int]
    denoiser: list[int]
    val: list[int]
    test: list[int]
    calibration: list[int] = field(default_factory=list)
    calibration_from: str = "train"
    extra: list[int] = field(default_factory=list)
    selection: list[int] = field(default_factory=list)

    def digest(self) -> str:
        """A short hash identifying the split (recorded in AE-cache manifests).

        Empty ``calibration``, ``extra`` and ``selection`` splits, and the default training pool of calibration,
        are left out, so runs made before they existed keep their digest.
        """
        fields = asdict(self)
        for name in ("calibration", "extra", "selection"):
            if not fields[name]:
                del fields[name]
        if fields["calibration_from"] == "train":
            del fields["calibration_from"]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]

    @property
    def calibration_split(self) -> str:
        """The split the detector's thresholds are calibrated on: ``calibration`` if carved, else ``val``."""
        return "calibration" if self.calibration else "val"


class ImageTensorDataset(Dataset):
    """``(image, label)`` pairs from in-memory tensors; uint8 images are scaled to [0, 1] on access unless
    ``raw`` (then the loader's ``collate_fn`` augments and scales whole batches, see :mod:`datamodules.augment`)."""

    def __init__(self, images: Tensor, labels: Tensor, indices: list[int] | None = None, raw: bool = False) -> None:
        self.images = images
        self.labels = labels
        self.indices = indices if indices is not None else list(range(len(labels)))
        self.raw = raw

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        j = self.indices[i]
        return (self.images[j] if self.raw else to_float(self.images[j])), self.labels[j]


def carve_splits(
    train_labels: Tensor,
    num_test: int,
    mmd_per_class: int,
    val_size: int,
    seed: int,
    test_size: int = 0,
    calibration_size: int = 0,
    calibration_from: str = "train",
    denoiser_size: int | None = None,
    selection_size: int = 0,
) -> Splits:
    """Carve the DAD splits deterministically from ``seed``.

    ``mmd`` takes exactly ``mmd_per_class`` images of every class; ``val`` is a random sample of ``val_size`` of
    the rest, then ``calibration`` and ``selection`` take ``calibration_size`` and ``selection_size`` of what is
    left; ``denoiser`` is what remains. If ``test_size`` > 0 the test split is carved from the training pool too
    (datasets without a test split), else it is the whole test pool of ``num_test`` images, in a seeded random
    order. With ``calibration_from="test"`` the calibration split is the first ``calibration_size`` images of that
    order instead, and the test split the rest. With ``denoiser_size``, the denoiser split is capped at that many
    images and the others form ``extra``.
    """
    if calibration_from not in ("train", "test"):
        raise ValueError(f"Expected `calibration_from` in ('train', 'test'), got {calibration_from!r}")
    if calibration_from == "test" and test_size > 0:
        raise DataError("`data.calibration_from: test` needs the dataset's own test split: set `data.test_size` 0")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_labels), generator=g)
    # The test split is kept in a seeded random order, so consecutive test batches are i.i.d. draws as the
    # batch-level detector assumes (ordered data, e.g. digits by writer, would make batches look shifted).
    if test_size > 0:
        test, order = order[:test_size].tolist(), order[test_size:]
    else:
        test = torch.randperm(num_test, generator=g).tolist()
    labels = train_labels[order]
    mmd: list[int] = []
    for c in labels.unique().tolist():
        members = order[labels == c]
        if len(members) < mmd_per_class:
            raise DataError(f"Class {c} has {len(members)} training images, fewer than mmd_per_class={mmd_per_class}")
        mmd.extend(members[:mmd_per_class].tolist())
    taken = set(mmd)
    rest = [i for i in order.tolist() if i not in taken]
    if calibration_from == "test":
        if len(test) <= calibration_size:
            raise DataError(f"The test pool has {len(test)} images: calibration_size={calibration_size} leaves none "
                            "to evaluate")
        calibration, test = sorted(test[:calibration_size]), test[calibration_size:]
        calibration_size = 0  # nothing more is held out of the training pool
    held_out = val_size + calibration_size + selection_size
    if len(rest) <= held_out:
        raise DataError(f"Only {len(rest)} training images after the MMD set: val_size={val_size}, calibration_size="
                        f"{calibration_size} and selection_size={selection_size} leave none for the denoiser")
    if calibration_from == "train":
        calibration = sorted(rest[val_size:val_size + calibration_size])
    remaining = rest[held_out:]
    cap = len(remaining) if denoiser_size is None else denoiser_size
    return Splits(mmd=sorted(mmd), denoiser=sorted(remaining[:cap]), val=sorted(rest[:val_size]), test=test,
                  calibration=calibration, calibration_from=calibration_from, extra=sorted(remaining[cap:]),
                  selection=sorted(rest[held_out - selection_size:held_out]))


class DADDataModule(pl.LightningDataModule):
    """In-memory image data with the DAD splits. Subclasses implement :meth:`load`.

    Args:
        settings: the data section (splits, loaders); :class:`~datamodules.settings.DataSettings`.
        seed: seed of the split.
    """

    num_classes: int
    image_shape: tuple[int, int, int]

    def __init__(self, settings: DataSettings = DataSettings(), seed: int = 0) -> None:
        super().__init__()
        self.settings = settings
        self.seed = seed
        self.batch_size = settings.batch_size
        self.train_images: Tensor | None = None
        self.train_labels: Tensor | None = None
        self.test_images: Tensor | None = None
        self.test_labels: Tensor | None = None
        self.splits: Splits | None = None

    def load(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Return ``(train_images, train_labels, test_images, test_labels)``; images (N, C, H, W), uint8 or
        float in [0, 1]; labels int64. ``test_*`` may be None when the dataset has no test split."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        train_x, train_y, test_x, test_y = self.load()
        subset = self.settings.subset
        if subset is not None:
            train_x, train_y = train_x[:subset], train_y[:subset]
            if test_x is not None:
                test_x, test_y = test_x[:subset], test_y[:subset]
        check_labels(train_y, self.num_classes)
        if test_x is None:
            if self.settings.test_size < 1:
                raise DataError("This dataset has no test split: set `test_size` > 0 to carve one")
            test_x, test_y = train_x, train_y
        else:
            check_labels(test_y, self.num_classes)
        self.train_images, self.train_labels = train_x, train_y
        cfg = self.settings
        self.splits = carve_splits(train_y, len(test_y), cfg.mmd_per_class, cfg.val_size, self.seed, cfg.test_size,
                                   cfg.calibration_size, cfg.calibration_from, cfg.denoiser_size,
                                   cfg.selection_size)
        self.test_images, self.test_labels = test_x, test_y

    def save_splits(self, path: str | Path) -> None:
        """Write the split indices (and their digest) as JSON."""
        assert self.splits is not None, "call setup() first"
        atomic_write_json({"digest": self.splits.digest(), **asdict(self.splits)}, path)

    def split_tensors(self, name: str) -> tuple[Tensor, Tensor]:
        """Float images in [0, 1] and labels of one split."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"Unknown split {name!r}; expected one of {SPLIT_NAMES}")
        self.setup()
        idx = torch.tensor(getattr(self.splits, name), dtype=torch.long)
        if name == "test" or (name == "calibration" and self.splits.calibration_from == "test"):
            return to_float(self.test_images[idx]), self.test_labels[idx]
        return to_float(self.train_images[idx]), self.train_labels[idx]

    def dataset(self, name: str, raw: bool = False) -> ImageTensorDataset:
        """The images of split ``name`` (``train`` is ``mmd`` + ``denoiser``), uint8 as stored if ``raw``."""
        self.setup()
        if name == "test" or (name == "calibration" and self.splits.calibration_from == "test"):
            return ImageTensorDataset(self.test_images, self.test_labels, getattr(self.splits, name), raw)
        if name == "train":
            train = sorted(self.splits.mmd + self.splits.denoiser + self.splits.extra)
            return ImageTensorDataset(self.train_images, self.train_labels, train, raw)
        return ImageTensorDataset(self.train_images, self.train_labels, getattr(self.splits, name), raw)

    def _loader(self, name: str, batch_size: int | None = None) -> DataLoader:
        data = self.dataset(name)
        return DataLoader(
            data,
            batch_size=batch_size or self.batch_size,
            sampler=ResumableSampler(len(data), shuffle=False, seed=self.seed, pad=False),
            num_workers=self.settings.num_workers,
            persistent_workers=self.settings.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # its iterators' seeds: the global stream untouched
        )

    def train_dataloader(self, augment: FlipCrop | None = None, batch_size: int | None = None) -> DeviceBatches:
        """Shuffled training batches, made on the device the model trains on (:mod:`datamodules.device_batches`);
        ``augment`` crops and flips each batch (the classifier's recipe); ``batch_size`` overrides
        ``data.batch_size`` (a stage with its own batch size)."""
        data = self.dataset("train", raw=True)
        rows = torch.tensor(data.indices, dtype=torch.long)
        return DeviceBatches(data.images[rows], data.labels[rows], batch_size or self.batch_size, self.seed, augment)

    def val_dataloader(self, batch_size: int | None = None) -> DataLoader:
        return self._loader("val", batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Raise :class:`DataError` if a label is outside ``[0, num_classes)``."""
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"Labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )


def open_torchvision_dataset(
    factory: Callable[..., Any], name: str, root: str | None, download: bool, layout: str, **kwargs: Any
) -> Any:
    """Open a torchvision dataset, turning its "not found" and failed downloads into one-line :class:`DataError`.

    Args:
        factory: the torchvision dataset class (called with ``root``, ``download`` and ``kwargs``).
        name: the dataset's name for messages (``"CIFAR-10"``).
        root: the data folder, or None when none was configured.
        download: let torchvision download the files (needs internet; never the default).
        layout: the files expected under ``root``, e.g. ``"cifar-10-batches-py/{data_batch_1..5,test_batch}"``.
        **kwargs: further arguments of ``factory`` (``train=True``, ``split="test"``).
    """
    where = root if root is not None else "DIR"
    hint = f"pass --data.root {where} holding {where}/{layout}, or --data.download true (needs internet)"
    if root is None:
        raise DataError(f"{name} needs a data folder: {hint}")
    try:
        return factory(root=root, download=download, **kwargs)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        raise DataError(f"{name} not found or corrupted under {root}: expected {root}/{layout}; {hint}") from None
    except OSError as err:  # a failed download (URLError is an OSError), or an unreadable folder
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"Could not get {name} into {root} ({reason}); place the files as {root}/{layout}") from None
