"""Image files in class folders: listing them (sorted per class, interleaved round-robin over the classes, so a
prefix stays class-balanced) and decoding them into one uint8 tensor (several threads, a progress bar, an optional
resize and centre crop), refusing what would not fit in memory. :mod:`datamodules.imagefolder` is their data
module."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from datamodules.base import DataError

__all__ = ["FolderIndex", "index_folders", "decode_images", "read_image", "check_fits", "IMAGE_EXTENSIONS",
           "TEST_FOLDERS"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"})
TEST_FOLDERS = ("val", "test")
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


def read_image(path: Path) -> Tensor:
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
    first = _fit(read_image(paths[0]), image_size, crop_fraction)
    out = torch.empty((len(paths), *first.shape), dtype=torch.uint8)

    def decode_chunk(start: int) -> int:
        for i in range(start, min(start + _CHUNK, len(paths))):
            image = _fit(read_image(paths[i]), image_size, crop_fraction)
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


def check_fits(num_images: int, shape: tuple[int, ...]) -> None:
    """Raise :class:`DataError` if ``num_images`` uint8 images of ``shape`` cannot be held in memory."""
    need = num_images * math.prod(shape)
    available = _available_memory()
    if available is not None and need > _MEMORY_SHARE * available:
        raise DataError(
            f"{num_images} images of shape {tuple(shape)} need {need / 2**30:.1f} GiB as uint8, more than the "
            f"{available / 2**30:.1f} GiB available: lower data.options.max_per_class or data.options.image_size"
        )
