"""Images in class folders (ImageNet layout, or CIFAR-10 stored as JPEGs), decoded once into memory as uint8.

Layouts under ``root``:

- ``root/train/<class>/<image>`` with ``root/val/<class>/<image>`` (or ``root/test/``): the second
  folder is the test pool (its classes must be among the training classes);
- ``root/<class>/<image>``: one folder; the test split is carved from it by the seed (``test_size`` > 0).

Every image is decoded once (several threads, a progress bar), optionally resized so its shorter side is
``image_size / crop_fraction`` and centre-cropped to ``image_size``, and kept as one ``(N, 3, H, W)`` uint8
tensor, so training epochs are never bound by decoding. ``cache_path`` optionally stores that tensor in a
file (keyed by the file list, sizes, modification times and the resizing), so later stages and runs skip
the decoding; nothing is ever written into the data folder.

Files are listed in sorted order per class and interleaved round-robin over the classes, so a prefix of
the pool (``subset``) stays class-balanced; ``max_per_class`` keeps the first images of every class. Both
are deterministic and independent of the seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from dad.io import atomic_torch_save
from datamodules.base import DADDataModule, DataError
from datamodules.image_files import FolderIndex, check_fits, decode_images, index_folders, read_image
from datamodules.settings import DataSettings

__all__ = ["ImageFolderDataModule", "FolderIndex", "index_folders", "decode_images"]

log = logging.getLogger(__name__)

_CACHE_FORMAT = "dad-imagefolder-cache"


class ImageFolderDataModule(DADDataModule):
    """Class-folder images with the DAD splits (see the module docstring for the layouts).

    ``settings.root`` is the data folder (``--data.root``), required; ``settings.download`` must stay false.

    Args:
        settings, seed: see :class:`~datamodules.base.DADDataModule`; a single folder needs ``test_size`` > 0.
        image_size: resize and centre-crop every image to this size (needed when sizes differ, e.g.
            ImageNet: 224); None keeps the images as they are (they must then share one size).
        crop_fraction: the crop's share of the resized shorter side (0.875: 256 -> 224).
        max_per_class: keep only the first images (sorted by file name) of every class, in both pools.
        cache_path: optional file for the decoded tensors (written once, reused while the files match).
        num_threads: decoding threads (default: the CPU count, at most 8).
        progress: show a progress bar while decoding.
    """

    def __init__(
        self,
        settings: DataSettings = DataSettings(dataset="imagefolder"),
        seed: int = 0,
        *,
        image_size: int | None = None,
        crop_fraction: float = 0.875,
        max_per_class: int | None = None,
        cache_path: str | None = None,
        num_threads: int | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(settings, seed)
        if settings.download:
            raise ValueError("ImageFolder data cannot be downloaded: set `download` false and pass --data.root DIR")
        if image_size is not None and image_size < 1:
            raise ValueError(f"Expected `image_size` >= 1, got {image_size}")
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"Expected `crop_fraction` in (0, 1], got {crop_fraction}")
        if max_per_class is not None and max_per_class < 1:
            raise ValueError(f"Expected `max_per_class` >= 1, got {max_per_class}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"Expected `num_threads` >= 1, got {num_threads}")
        self.root = settings.root
        self.image_size = image_size
        self.crop_fraction = crop_fraction
        self.max_per_class = max_per_class
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        self.progress = progress

    @cached_property
    def index(self) -> FolderIndex:
        """The listed files (``subset`` applied); listing happens once, decoding in :meth:`load`."""
        if self.root is None:
            raise DataError("ImageFolder needs a data folder: pass --data.root DIR (DIR/<class>/<image>.jpg, or "
                            "DIR/train/<class>/... with DIR/val/<class>/...)")
        index = index_folders(self.root, self.max_per_class)
        if self.settings.subset is None:
            return index
        n = self.settings.subset
        return FolderIndex(index.classes, index.train_files[:n], index.train_labels[:n], index.test_files[:n],
                           index.test_labels[:n])

    @property
    def classes(self) -> list[str]:
        """Class names (folder names, sorted); label ``i`` is ``classes[i]``."""
        return self.index.classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.index.classes)

    @cached_property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        if self.image_size is not None:
            return (3, self.image_size, self.image_size)
        return tuple(read_image(self.index.train_files[0]).shape)  # type: ignore[return-value]

    def _cache_key(self) -> str:
        """Identifies the decoded tensors: the files (path, size, mtime) and the resizing."""
        digest = hashlib.sha256(json.dumps([self.image_size, self.crop_fraction, self.index.classes]).encode())
        for path in (*self.index.train_files, None, *self.index.test_files):
            if path is None:
                digest.update(b"|test|")
                continue
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def _read_cache(self, key: str) -> tuple[Tensor, Tensor | None] | None:
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        try:
            payload = torch.load(self.cache_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):
            log.warning("Image cache %s is unreadable: decoding the images again", self.cache_path)
            return None
        if not isinstance(payload, dict) or payload.get("format") != _CACHE_FORMAT or payload.get("key") != key:
            log.info("Image cache %s was made from other files or settings: decoding the images again", self.cache_path)
            return None
        return payload["train"], payload["test"]

    def load(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        index = self.index
        key = self._cache_key() if self.cache_path is not None else ""
        cached = self._read_cache(key)
        if cached is not None:
            train_x, test_x = cached
        else:
            check_fits(len(index.train_files) + len(index.test_files), self.image_shape)
            decode = dict(image_size=self.image_size, crop_fraction=self.crop_fraction, num_threads=self.num_threads,
                          progress=self.progress)
            train_x = decode_images(index.train_files, desc="decoding train images", **decode)
            test_x = (decode_images(index.test_files, desc="decoding test images", **decode) if index.test_files
                      else None)
            if self.cache_path is not None:
                atomic_torch_save({"format": _CACHE_FORMAT, "key": key, "train": train_x, "test": test_x},
                                  self.cache_path)
        train_y = torch.tensor(index.train_labels, dtype=torch.long)
        test_y = torch.tensor(index.test_labels, dtype=torch.long) if test_x is not None else None
        return train_x, train_y, test_x, test_y
