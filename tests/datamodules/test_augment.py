"""Flip and crop on uint8 batches against their definition."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from datamodules import DataSettings, DigitsDataModule
from datamodules.augment import FlipCrop, flip_crop


def test_flip_crop_matches_its_definition_image_by_image() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    out = flip_crop(images, padding=2, generator=torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    # the same draws, replayed: offsets first, then flips
    replay = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, 5, (2, 16), generator=replay)
    flips = torch.rand(16, generator=replay) < 0.5
    padded = F.pad(images, (2, 2, 2, 2))
    for i in range(16):
        dy, dx = offsets[:, i].tolist()
        expected = padded[i, :, dy:dy + 8, dx:dx + 8]
        if flips[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected), i
    assert 0 < flips.sum() < 16  # both kinds were exercised


def test_no_padding_and_no_flip_is_the_identity_and_flip_only_flips() -> None:
    images = torch.randint(0, 256, (8, 1, 5, 7), dtype=torch.uint8)
    assert torch.equal(flip_crop(images, padding=0, flip=False), images)
    flipped = flip_crop(images, padding=0, generator=torch.Generator().manual_seed(0))
    for a, b in zip(flipped, images):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    with pytest.raises(ValueError, match="padding"):
        flip_crop(images, padding=-1)


def test_the_training_loader_augments_uint8_batches() -> None:
    dm = DigitsDataModule(DataSettings(subset=300, test_size=50, val_size=50, mmd_per_class=5, batch_size=32))
    x, y = next(iter(dm.train_dataloader(augment=FlipCrop(padding=1))))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.shape == (32,) and y.dtype == torch.long
