"""The DAD splits: disjoint, seeded, class-balanced MMD set, and the optional calibration split."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from datamodules import DataError, DataSettings
from datamodules.base import carve_splits
from datamodules.digits import DigitsDataModule

LABELS = torch.arange(400) % 10


def test_splits_are_disjoint_and_cover_the_training_pool() -> None:
    s = carve_splits(LABELS, 0, mmd_per_class=5, val_size=60, seed=3, test_size=80, calibration_size=100)
    parts = [s.test, s.mmd, s.val, s.calibration, s.denoiser]
    assert [len(p) for p in parts] == [80, 50, 60, 100, 110]
    assert sorted(i for p in parts for i in p) == list(range(400))
    assert torch.bincount(LABELS[s.mmd], minlength=10).tolist() == [5] * 10
    assert s.calibration_split == "calibration"


def test_without_a_calibration_split_val_calibrates_and_the_digest_is_unchanged() -> None:
    s = carve_splits(LABELS, 0, mmd_per_class=5, val_size=60, seed=3, test_size=80)
    assert s.calibration == [] and s.calibration_split == "val"
    # the split of a run made before the calibration split existed keeps its digest (AE caches stay valid)
    legacy = {"mmd": s.mmd, "denoiser": s.denoiser, "val": s.val, "test": s.test}
    assert s.digest() == hashlib.sha256(json.dumps(legacy).encode()).hexdigest()[:16]
    with_calibration = carve_splits(LABELS, 0, mmd_per_class=5, val_size=60, seed=3, test_size=80, calibration_size=10)
    assert with_calibration.digest() != s.digest()
    assert with_calibration.val == s.val and with_calibration.test == s.test and with_calibration.mmd == s.mmd


def test_a_calibration_split_that_leaves_no_denoiser_data_is_refused() -> None:
    with pytest.raises(DataError, match="calibration_size=270 and selection_size=0 leave none for the denoiser"):
        carve_splits(LABELS, 0, mmd_per_class=5, val_size=60, seed=3, test_size=20, calibration_size=270)


def test_a_selection_split_is_held_out_of_everything_else_and_changes_nothing_else() -> None:
    """The route-selection split comes out of the denoiser's share only: val, calibration, MMD and test are the
    same images, and a run without one keeps its digest."""
    base = carve_splits(LABELS, 0, mmd_per_class=5, val_size=60, seed=3, test_size=80, calibration_size=10)
    s = carve_splits(LABELS, 0, mmd_per_class=5, val_size=60, seed=3, test_size=80, calibration_size=10,
                     selection_size=30)
    assert (s.val, s.calibration, s.mmd, s.test) == (base.val, base.calibration, base.mmd, base.test)
    assert len(s.selection) == 30 and set(s.selection) <= set(base.denoiser)
    assert set(s.denoiser) == set(base.denoiser) - set(s.selection)
    assert base.selection == [] and s.digest() != base.digest()


def test_datamodule_serves_the_calibration_split() -> None:
    dm = DigitsDataModule(DataSettings(mmd_per_class=5, val_size=50, test_size=50, calibration_size=70, subset=400))
    x, y = dm.split_tensors("calibration")
    assert x.shape == (70, 1, 8, 8) and y.shape == (70,) and 0.0 <= x.min() and x.max() <= 1.0
    assert not set(dm.splits.calibration) & set(dm.splits.val) and len(dm.dataset("calibration")) == 70
    with pytest.raises(ValueError, match="calibration_size"):
        DataSettings(calibration_size=-1)


def test_calibration_from_the_test_pool_is_disjoint_from_the_evaluated_test_images() -> None:
    labels = torch.arange(600) % 10
    splits = carve_splits(labels, 300, mmd_per_class=5, val_size=50, seed=0, calibration_size=100,
                          calibration_from="test")
    assert len(splits.calibration) == 100 and len(splits.test) == 200
    assert not set(splits.calibration) & set(splits.test)
    assert set(splits.calibration) | set(splits.test) == set(range(300))
    assert len(splits.denoiser) == 600 - 50 - 50  # nothing more is held out of the training pool
    train = carve_splits(labels, 300, mmd_per_class=5, val_size=50, seed=0, calibration_size=100)
    assert splits.digest() != train.digest() and train.calibration_from == "train"
    with pytest.raises(DataError, match="own test split"):
        carve_splits(labels, 0, mmd_per_class=5, val_size=50, seed=0, test_size=50, calibration_size=10,
                     calibration_from="test")


def test_a_capped_denoiser_split_leaves_the_rest_to_the_classifier() -> None:
    labels = torch.arange(600) % 10
    full = carve_splits(labels, 100, mmd_per_class=5, val_size=50, seed=0)
    capped = carve_splits(labels, 100, mmd_per_class=5, val_size=50, seed=0, denoiser_size=120)
    assert len(capped.denoiser) == 120 and set(capped.denoiser) | set(capped.extra) == set(full.denoiser)
    assert not set(capped.denoiser) & set(capped.extra) and full.extra == []
    assert capped.digest() != full.digest() and full.digest() == carve_splits(labels, 100, 5, 50, 0).digest()
