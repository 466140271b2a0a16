"""ImageFolder data module on tiny fake class folders written with PIL."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.imagefolder as imagefolder
from datamodules import DataError, DataSettings, ImageFolderDataModule
from datamodules.registry import build_datamodule

CLASSES = ("cat", "dog", "frog")


def write_folder(root: Path, per_class: int, size: tuple[int, int] = (8, 8), fmt: str = "png",
                 classes: tuple[str, ...] = CLASSES, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """``root/<class>/NNN.<fmt>`` with random RGB pixels (H x W = ``size``); returns the pixels per class."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[np.ndarray]] = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        written[name] = []
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.{fmt}")
            written[name].append(pixels)
    return written


_SPLIT_OPTIONS = {"mmd_per_class", "val_size", "test_size", "calibration_size", "subset", "download"}


def module(root: Path | None, seed: int = 0, **kwargs: object) -> ImageFolderDataModule:
    """The data module on ``root``; split options go to its settings, the rest are its own options."""
    given = {**dict(mmd_per_class=2, val_size=6, test_size=6, progress=False, num_threads=2), **kwargs}
    split = {k: v for k, v in given.items() if k in _SPLIT_OPTIONS}
    own = {k: v for k, v in given.items() if k not in _SPLIT_OPTIONS}
    settings = DataSettings(dataset="imagefolder", root=None if root is None else str(root), **split)  # type: ignore
    return ImageFolderDataModule(settings, seed, **own)  # type: ignore[arg-type]


def as_chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)


def test_single_folder_is_decoded_once_as_uint8_with_interleaved_labels(tmp_path):
    written = write_folder(tmp_path, per_class=10)
    dm = module(tmp_path)
    assert dm.classes == list(CLASSES) and dm.num_classes == 3 and dm.image_shape == (3, 8, 8)
    dm.setup()
    assert dm.train_images.dtype == torch.uint8 and dm.train_images.shape == (30, 3, 8, 8)
    assert dm.train_labels.tolist() == [0, 1, 2] * 10  # round-robin over the classes
    for i in (0, 4, 29):
        name, k = CLASSES[i % 3], i // 3
        assert torch.equal(dm.train_images[i], as_chw(written[name][k]))  # PNG: lossless
    # one pool: the test split is carved from it, disjoint from every other split
    assert dm.test_images is dm.train_images
    s = dm.splits
    assert len(s.test) == 6 and len(s.mmd) == 6 and len(s.val) == 6 and len(s.denoiser) == 12
    assert len(set(s.test) | set(s.mmd) | set(s.val) | set(s.denoiser)) == 30
    images, labels = dm.split_tensors("test")
    assert images.dtype == torch.float32 and torch.equal(images, dm.train_images[torch.tensor(s.test)].float() / 255)
    assert torch.equal(labels, dm.train_labels[torch.tensor(s.test)])


def test_splits_are_a_function_of_the_seed(tmp_path):
    write_folder(tmp_path, per_class=10)
    a, b, c = module(tmp_path, seed=3), module(tmp_path, seed=3), module(tmp_path, seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert a.splits == b.splits and a.splits.digest() == b.splits.digest()
    assert a.splits.test != c.splits.test


def test_max_per_class_and_subset_keep_every_class(tmp_path):
    written = write_folder(tmp_path, per_class=10)
    dm = module(tmp_path, max_per_class=6, mmd_per_class=1, val_size=4, test_size=4)
    dm.setup()
    assert dm.train_labels.tolist() == [0, 1, 2] * 6
    assert torch.equal(dm.train_images[3 * 5 + 1], as_chw(written["dog"][5]))  # the first 6 files, sorted
    dm = module(tmp_path, subset=15, mmd_per_class=1, val_size=4, test_size=4)
    dm.setup()
    assert len(dm.train_labels) == 15 and torch.bincount(dm.train_labels).tolist() == [5, 5, 5]


def test_train_and_val_folders(tmp_path):
    write_folder(tmp_path / "train", per_class=6)
    val = write_folder(tmp_path / "val", per_class=2, classes=("dog", "frog"), seed=1)
    dm = module(tmp_path, test_size=0)
    dm.setup()
    assert dm.train_images.shape == (18, 3, 8, 8) and dm.test_images.shape == (4, 3, 8, 8)
    assert dm.test_labels.tolist() == [1, 2, 1, 2]  # labels follow the training folder's classes
    assert torch.equal(dm.test_images[3], as_chw(val["frog"][1]))
    assert sorted(dm.splits.test) == [0, 1, 2, 3]


def test_image_size_resizes_and_crops_mixed_sizes(tmp_path):
    write_folder(tmp_path / "a", per_class=4, size=(20, 30), classes=("x",))
    write_folder(tmp_path / "b", per_class=4, size=(40, 24), classes=("y",), seed=1)
    root = tmp_path / "mixed"
    root.mkdir()
    (tmp_path / "a" / "x").rename(root / "x")
    (tmp_path / "b" / "y").rename(root / "y")
    dm = module(root, image_size=16, mmd_per_class=1, val_size=2, test_size=2)
    assert dm.image_shape == (3, 16, 16)
    dm.setup()
    assert dm.train_images.shape == (8, 3, 16, 16) and dm.train_images.dtype == torch.uint8
    with pytest.raises(DataError, match="image_size"):
        module(root, mmd_per_class=1, val_size=2, test_size=2).setup()


def test_jpeg_and_grayscale_decode_to_rgb(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    flat = np.full((32, 32, 3), (200, 40, 90), dtype=np.uint8)
    for i in range(4):
        Image.fromarray(flat).save(tmp_path / "a" / f"{i}.jpg", quality=95)
        Image.fromarray(np.full((32, 32), 77, dtype=np.uint8), mode="L").save(tmp_path / "b" / f"{i}.jpeg")
    dm = module(tmp_path, mmd_per_class=1, val_size=2, test_size=2)
    dm.setup()
    assert dm.train_images.shape == (8, 3, 32, 32)
    colour, gray = dm.train_images[0].int(), dm.train_images[1].int()
    assert (colour - torch.tensor([200, 40, 90]).view(3, 1, 1)).abs().max() <= 3
    assert (gray - 77).abs().max() <= 1


def test_cache_file_is_reused_and_invalidated(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_folder(data, per_class=8)
    cache = tmp_path / "cache" / "decoded.pt"
    first = module(data, cache_path=str(cache))
    first.setup()
    assert cache.is_file()

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(imagefolder, "decode_images", no_decoding)
        second = module(data, cache_path=str(cache))
        second.setup()
    assert torch.equal(second.train_images, first.train_images) and second.splits == first.splits
    # a changed file changes the key: decoded again, with the new pixels
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(data / "cat" / "000.png")
    third = module(data, cache_path=str(cache))
    third.setup()
    assert int(third.train_images[0].sum()) == 0


@pytest.mark.parametrize("layout", ["missing", "no_classes", "empty_class", "unknown_val_class"])
def test_bad_folders_are_one_line_data_errors(tmp_path, layout):
    root = tmp_path / "root"
    if layout == "no_classes":
        root.mkdir()
    elif layout == "empty_class":
        write_folder(root, per_class=3)
        (root / "zebra").mkdir()
    elif layout == "unknown_val_class":
        write_folder(root / "train", per_class=3)
        write_folder(root / "val", per_class=1, classes=("cat", "owl"))
    with pytest.raises(DataError) as info:
        module(root).setup()
    message = str(info.value)
    assert "\n" not in message and str(root) in message


def test_no_root_and_download_are_refused(tmp_path):
    with pytest.raises(DataError, match="--data.root"):
        module(None).setup()
    with pytest.raises(ValueError, match="cannot be downloaded"):
        module(tmp_path, download=True)


def test_built_from_the_data_config(tmp_path):
    write_folder(tmp_path, per_class=8)
    cfg = DataSettings(dataset="imagefolder", root=str(tmp_path), mmd_per_class=2, val_size=4, test_size=3,
                       options={"max_per_class": 5, "progress": False})
    dm = build_datamodule(cfg, seed=0)
    dm.setup()
    assert isinstance(dm, ImageFolderDataModule) and len(dm.train_labels) == 15 and len(dm.splits.test) == 3
    with pytest.raises(ValueError, match="max_per_klass"):
        build_datamodule(replace(cfg, options={"max_per_klass": 5}), seed=0)
