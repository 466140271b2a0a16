"""Training batches made on the device that holds the data: the DataLoader's batches on the CPU, resumable."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from datamodules import DataSettings, DigitsDataModule
from datamodules.augment import FlipCrop
from datamodules.device_batches import DeviceBatches
from datamodules.sampling import ResumableSampler
from datamodules.synthetic import SyntheticDataModule, synthetic_images


def _uint8(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=g), torch.arange(n)


def test_on_the_cpu_the_batches_are_the_augmenting_data_loaders() -> None:
    images, labels = _uint8()
    loader = DataLoader(list(zip(images, labels)), batch_size=16, sampler=ResumableSampler(50, shuffle=True, seed=3),
                        collate_fn=FlipCrop(padding=2), generator=torch.Generator().manual_seed(0))  # as replaced
    batches = DeviceBatches(images, labels, 16, seed=3, augment=FlipCrop(padding=2))
    assert len(batches) == len(loader) == 4
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches.sampler.set_epoch(epoch)
        torch.manual_seed(epoch)
        expected = list(loader)
        torch.manual_seed(epoch)
        for (x, y), (x_ref, y_ref) in zip(batches, expected, strict=True):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
            assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0


def test_batches_are_made_where_the_data_were_moved() -> None:
    images, labels = _uint8()
    batches = DeviceBatches(images, labels, 16, augment=FlipCrop(padding=1)).to(torch.device("meta"))
    x, y = next(iter(batches))
    assert x.device.type == y.device.type == "meta" and x.shape == (16, 3, 6, 6)


def test_a_resumed_epoch_skips_the_consumed_batches() -> None:
    images, labels = _uint8()
    full = [y for _, y in DeviceBatches(images, labels, 16, seed=1)]
    resumed = DeviceBatches(images, labels, 16, seed=1)
    resumed.sampler.skip_samples = 2 * 16
    assert [y.tolist() for _, y in resumed] == [y.tolist() for y in full[2:]]


def test_the_training_loader_of_a_data_module_holds_the_training_split() -> None:
    dm = DigitsDataModule(DataSettings(subset=300, test_size=50, val_size=50, mmd_per_class=5, batch_size=32))
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches) and loader.num_samples == len(dm.dataset("train"))
    x, _ = next(iter(loader))
    assert x.shape == (32, 1, 8, 8)


def test_synthetic_images_are_seeded_uint8_and_separable_by_class() -> None:
    images, labels = synthetic_images(2000, 10, 3, 32, seed=0)
    again, _ = synthetic_images(2000, 10, 3, 32, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (2000, 3, 32, 32) and torch.equal(images, again)
    means = torch.stack([images[labels == c].float().mean(0).flatten() for c in range(10)])
    nearest = torch.cdist(images.float().flatten(1), means).argmin(1)  # nearest class mean
    assert (nearest == labels).float().mean() > 0.9
    dm = SyntheticDataModule(DataSettings(dataset="synthetic", test_size=200, val_size=100, mmd_per_class=5),
                             num_train=1000, image_size=16)
    x, y = dm.split_tensors("test")
    assert x.shape == (200, 3, 16, 16) and dm.num_classes == 10
