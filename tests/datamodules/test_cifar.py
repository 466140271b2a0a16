"""CIFAR-10/100 data modules on tiny fake python-pickle batches (torchvision's md5 check patched out)."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from datamodules import CIFAR10DataModule, CIFAR100DataModule, DataError, DataSettings

TRAIN_PER_BATCH = 30
NUM_TEST = 40


def _settings(dataset: str, root: str | None, **kwargs: object) -> DataSettings:
    return DataSettings(dataset=dataset, root=root, test_size=0, **kwargs)  # type: ignore[arg-type]


def _write_batch(path: Path, data: np.ndarray, labels: list[int], label_key: str) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": data.reshape(len(data), -1), label_key: labels}, f)


def fake_cifar(root: Path, cifar100: bool = False) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Write a fake CIFAR folder; return the (N, 3, 32, 32) train/test pixels and labels written."""
    rng = np.random.default_rng(0)
    classes = 100 if cifar100 else 10
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if cifar100 else "labels"
    names = ["train"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)]
    per_file = TRAIN_PER_BATCH * 5 // len(names)
    train_x = rng.integers(0, 256, (per_file * len(names), 3, 32, 32), dtype=np.uint8)
    train_y = [i % classes for i in range(len(train_x))]
    for k, name in enumerate(names):
        rows = slice(k * per_file, (k + 1) * per_file)
        _write_batch(folder / name, train_x[rows], train_y[rows], label_key)
    test_x = rng.integers(0, 256, (NUM_TEST, 3, 32, 32), dtype=np.uint8)
    test_y = [(3 * i) % classes for i in range(NUM_TEST)]
    _write_batch(folder / ("test" if cifar100 else "test_batch"), test_x, test_y, label_key)
    meta_key = "fine_label_names" if cifar100 else "label_names"
    with open(folder / ("meta" if cifar100 else "batches.meta"), "wb") as f:
        pickle.dump({meta_key: [f"c{i}" for i in range(classes)]}, f)
    return train_x, train_y, test_x, test_y


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


def test_cifar10_reads_pixels_labels_and_official_test_split(tmp_path, no_md5):
    train_x, train_y, test_x, test_y = fake_cifar(tmp_path)
    dm = CIFAR10DataModule(_settings("cifar10", root=str(tmp_path), mmd_per_class=3, val_size=20), seed=1)
    dm.setup()
    assert dm.train_images.dtype == torch.uint8 and dm.train_images.shape == (150, 3, 32, 32)
    assert torch.equal(dm.train_images, torch.from_numpy(train_x))
    assert dm.train_labels.tolist() == train_y
    assert torch.equal(dm.test_images, torch.from_numpy(test_x)) and dm.test_labels.tolist() == test_y
    assert sorted(dm.splits.test) == list(range(NUM_TEST))  # test_size=0: the official test split, all of it
    assert len(dm.splits.mmd) == 30 and len(dm.splits.val) == 20 and len(dm.splits.denoiser) == 100
    images, labels = dm.split_tensors("val")
    idx = torch.tensor(dm.splits.val)
    assert images.dtype == torch.float32
    assert torch.equal(images, torch.from_numpy(train_x)[idx].float() / 255)
    assert torch.equal(labels, torch.tensor(train_y)[idx])


def test_cifar10_accepts_the_batches_folder_itself(tmp_path, no_md5):
    fake_cifar(tmp_path)
    dm = CIFAR10DataModule(_settings("cifar10", str(tmp_path / "cifar-10-batches-py"), mmd_per_class=3, val_size=20))
    dm.setup()
    assert len(dm.train_labels) == 150


def test_cifar100_uses_fine_labels(tmp_path, no_md5):
    _, train_y, _, test_y = fake_cifar(tmp_path, cifar100=True)
    dm = CIFAR100DataModule(_settings("cifar100", root=str(tmp_path), mmd_per_class=1, val_size=10))
    dm.setup()
    assert dm.num_classes == 100 and dm.train_labels.tolist() == train_y and dm.test_labels.tolist() == test_y
    assert len(dm.splits.mmd) == 100


def _one_line_error(dm: CIFAR10DataModule) -> str:
    with pytest.raises(DataError) as info:
        dm.setup()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_cifar_names_the_layout_and_the_flags(tmp_path):
    message = _one_line_error(CIFAR10DataModule(_settings("cifar10", root=str(tmp_path / "nowhere"))))
    assert f"{tmp_path / 'nowhere'}/cifar-10-batches-py/{{data_batch_1..5,test_batch,batches.meta}}" in message
    assert "--data.root" in message and "--data.download true" in message
    message = _one_line_error(CIFAR100DataModule(_settings("cifar100", str(tmp_path))))
    assert "cifar-100-python/{train,test,meta}" in message
    assert "--data.root" in _one_line_error(CIFAR10DataModule(_settings("cifar10", root=None)))


def test_corrupted_cifar_files_fail_the_md5_check(tmp_path):
    fake_cifar(tmp_path)  # real torchvision integrity check: the fake files do not match CIFAR's md5
    assert "not found or corrupted" in _one_line_error(CIFAR10DataModule(_settings("cifar10", root=str(tmp_path))))


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    message = _one_line_error(CIFAR10DataModule(_settings("cifar10", root=str(tmp_path), download=True)))
    assert "no network" in message and "cifar-10-batches-py/" in message
