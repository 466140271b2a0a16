"""SVHN data module on tiny fake ``.mat`` files (torchvision's md5 check patched out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.svhn

from datamodules import DataError, DataSettings, SVHNDataModule


def _settings(root: str, **kwargs: object) -> DataSettings:
    return DataSettings(dataset="svhn", root=root, test_size=0, **kwargs)  # type: ignore[arg-type]


def fake_svhn(root: Path, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Write ``<split>_32x32.mat`` (X: H x W x C x N, y: labels 1..10); return (N, C, H, W) pixels and 0-9 labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).reshape(n, 1)  # SVHN stores the digit 0 as label 10
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return x.transpose(3, 2, 0, 1), y.ravel() % 10


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args, **kwargs: True)


def test_svhn_reads_pixels_and_maps_label_10_to_0(tmp_path, no_md5):
    train_x, train_y = fake_svhn(tmp_path, "train", 60, 0)
    test_x, test_y = fake_svhn(tmp_path, "test", 25, 1)
    dm = SVHNDataModule(_settings(root=str(tmp_path), mmd_per_class=2, val_size=10))
    dm.setup()
    assert dm.train_images.dtype == torch.uint8 and dm.train_images.shape == (60, 3, 32, 32)
    assert torch.equal(dm.train_images, torch.from_numpy(train_x))
    assert dm.train_labels.tolist() == train_y.tolist() and 0 in dm.train_labels.tolist()
    assert torch.equal(dm.test_images, torch.from_numpy(test_x)) and dm.test_labels.tolist() == test_y.tolist()
    assert len(dm.splits.mmd) == 20 and sorted(dm.splits.test) == list(range(25))


def test_svhn_extra_joins_the_training_pool(tmp_path, no_md5):
    train_x, _ = fake_svhn(tmp_path, "train", 30, 0)
    fake_svhn(tmp_path, "test", 10, 1)
    extra_x, _ = fake_svhn(tmp_path, "extra", 20, 2)
    dm = SVHNDataModule(_settings(root=str(tmp_path), mmd_per_class=2, val_size=10), extra=True)
    dm.setup()
    assert torch.equal(dm.train_images, torch.from_numpy(np.concatenate([train_x, extra_x])))


def test_missing_svhn_is_one_line_naming_the_files(tmp_path):
    with pytest.raises(DataError) as info:
        SVHNDataModule(_settings(root=str(tmp_path))).setup()
    message = str(info.value)
    assert "\n" not in message and f"{tmp_path}/{{train,test}}_32x32.mat" in message
    assert "--data.root" in message and "--data.download true" in message
