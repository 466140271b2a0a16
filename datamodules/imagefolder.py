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
import math
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from dad.io import atomic_torch_save
from datamodules.base import DADDataModule, DataError
from datamodules.settings import DataSettings

__all__ = ["ImageFolderDataModule", "FolderIndex", "index_folders", "decode_images"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"})
TEST_FOLDERS = ("val", "test")
_CACHE_FORMAT = "dad-imagefolder-cache"
_CHUNK = 256  # images per decoding task (and per progress-bar update)
_MEMORY_SHARE = 0.9  # largest share of the available memory the decoded images may take


@dataclass(frozen=True)
class FolderIndex:
    """The image files of both pools, in class-interleaved order, and their labels.

    ``test_files`` is empty for a single-folder layout (the test split is then carved from training).
    """

    classes: list[str]
    train_files: list[Path]
    train_labels: list[int]
    test_files: list[Path]
    test_labels: list[int]


def _class_files(folder: Path, max_per_class: int | None) -> dict[str, list[Path]]:
    """Sorted image files of each class subfolder of ``folder`` (the first ``max_per_class`` of each)."""
    if not folder.is_dir():
        raise DataError(f"Image folder {folder} does not exist: expected {folder}/<class>/<image>.jpg")
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"No class subfolders in {folder}: expected {folder}/<class>/<image>.jpg")
    files: dict[str, list[Path]] = {}
    for name in classes:
        found = sorted(e.name for e in os.scandir(folder / name) if Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DataError(f"Class folder {folder / name} holds no images (extensions: {sorted(IMAGE_EXTENSIONS)})")
        files[name] = [folder / name / f for f in found[:max_per_class]]
    return files


def _interleave(files: dict[str, list[Path]], classes: list[str]) -> tuple[list[Path], list[int]]:
    """Files round-robin over the classes (label = index in ``classes``), so every prefix is balanced."""
    label_of = {name: i for i, name in enumerate(classes)}
    per_class = [(label_of[name], paths) for name, paths in files.items()]
    out_files: list[Path] = []
    out_labels: list[int] = []
    for i in range(max(len(paths) for _, paths in per_class)):
        for label, paths in per_class:
            if i < len(paths):
                out_files.append(paths[i])
                out_labels.append(label)
    return out_files, out_labels


def index_folders(root: str | Path, max_per_class: int | None = None) -> FolderIndex:
    """List the images of ``root`` (either layout of the module docstring).

    Raises:
        DataError: a missing root, no class folders, an empty class folder, or test classes unknown
            to the training folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist: pass --data.root DIR with DIR/<class>/<image>.jpg "
                        "or DIR/train/<class>/... and DIR/val/<class>/...")
    train_dir = root / "train" if (root / "train").is_dir() else root
    train = _class_files(train_dir, max_per_class)
    classes = list(train)
    train_files, train_labels = _interleave(train, classes)
    test_files: list[Path] = []
    test_labels: list[int] = []
    test_dir = next((root / n for n in TEST_FOLDERS if (root / n).is_dir()), None) if train_dir != root else None
    if test_dir is not None:
        test = _class_files(test_dir, max_per_class)
        unknown = sorted(set(test) - set(classes))
        if unknown:
            raise DataError(f"{test_dir} has classes missing from {train_dir}: {unknown[:3]}")
        test_files, test_labels = _interleave(test, classes)
    return FolderIndex(classes, train_files, train_labels, test_files, test_labels)


def _read_image(path: Path) -> Tensor:
    """One image as (3, H, W) uint8 RGB: torchvision's decoders, PIL for the formats they lack."""
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except RuntimeError:
        try:
            with Image.open(path) as image:
                return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"Cannot decode {path}: {' '.join(str(err).split())}") from None


def _fit(image: Tensor, image_size: int | None, crop_fraction: float) -> Tensor:
    """Resize the shorter side to ``image_size / crop_fraction`` and centre-crop ``image_size`` (None: as is)."""
    if image_size is None:
        return image
    short = round(image_size / crop_fraction)
    if min(image.shape[-2:]) != short:
        image = TF.resize(image, [short], antialias=True)
    return TF.center_crop(image, [image_size, image_size])


def decode_images(
    paths: Sequence[Path],
    image_size: int | None = None,
    crop_fraction: float = 0.875,
    num_threads: int = 1,
    desc: str = "decoding images",
    progress: bool = True,
) -> Tensor:
    """Decode ``paths`` into one ``(N, 3, H, W)`` uint8 tensor, ``num_threads`` at a time.

    Raises:
        DataError: an undecodable file, or images of different sizes while ``image_size`` is None.
    """
    first = _fit(_read_image(paths[0]), image_size, crop_fraction)
    out = torch.empty((len(paths), *first.shape), dtype=torch.uint8)

    def decode_chunk(start: int) -> int:
        for i in range(start, min(start + _CHUNK, len(paths))):
            image = _fit(_read_image(paths[i]), image_size, crop_fraction)
            if image.shape != first.shape:
                raise DataError(
                    f"{paths[i]} is {image.shape[1]}x{image.shape[2]} but {paths[0]} is {first.shape[1]}x"
                    f"{first.shape[2]}: set data.options.image_size to bring all images to one size"
                )
            out[i] = image
        return min(_CHUNK, len(paths) - start)

    with ThreadPoolExecutor(num_threads) as pool, tqdm(total=len(paths), desc=desc, disable=not progress) as bar:
        for done in pool.map(decode_chunk, range(0, len(paths), _CHUNK)):
            bar.update(done)
    return out


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_fits(num_images: int, shape: tuple[int, ...]) -> None:
    """Raise :class:`DataError` if ``num_images`` uint8 images of ``shape`` cannot be held in memory."""
    need = num_images * math.prod(shape)
    available = _available_memory()
    if available is not None and need > _MEMORY_SHARE * available:
        raise DataError(
            f"{num_images} images of shape {tuple(shape)} need {need / 2**30:.1f} GiB as uint8, more than the "
            f"{available / 2**30:.1f} GiB available: lower data.options.max_per_class or data.options.image_size"
        )


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
        return tuple(_read_image(self.index.train_files[0]).shape)  # type: ignore[return-value]

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
            _check_fits(len(index.train_files) + len(index.test_files), self.image_shape)
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
