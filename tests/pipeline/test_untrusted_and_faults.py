"""Untrusted files are never executed; corrupted caches are regenerated; bad inputs raise documented errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from dad.attacks import AttackSpec
from dad.defense import InvalidInputError
from dad.defense_file import load_defense
from dad.io import IncompatibleFileError
from dad.models import create_model, load_classifier_weights
from datamodules.ae_cache import load_or_generate
from pipeline.checkpoints import AtomicCheckpointIO, StageCheckpointError, read_checkpoint
from tests.pipeline.test_cli_errors import _Marker


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": "dad-defense", "version": 1, "state_dict": _Marker(str(marker))}
    path.write_bytes(pickle.dumps(payload))
    return path, marker


def test_every_loader_refuses_a_code_carrying_pickle(evil):
    path, marker = evil
    loaders = [
        (lambda: load_defense(path), IncompatibleFileError),
        (lambda: read_checkpoint(path, "kernel"), StageCheckpointError),
        (lambda: load_classifier_weights(create_model("small_cnn"), str(path)), ValueError),
        (lambda: AtomicCheckpointIO().load_checkpoint(path), StageCheckpointError),
    ]
    for load, error in loaders:
        with pytest.raises(error):
            load()
    assert not marker.exists()


def test_truncated_ae_cache_is_detected_and_regenerated(tmp_path, caplog):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(12, 1, 8, 8), torch.randint(0, 10, (12,))
    attack = AttackSpec(name="pgd", eps=0.1, step_size=0.05, steps=2, batch_size=5)
    path = tmp_path / "aes" / "mmd.pt"
    first = load_or_generate(model, x, y, attack, path, "h", "d", "mmd")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a crash mid-copy, a full disk...
    with caplog.at_level("WARNING"):
        second = load_or_generate(model, x, y, attack, path, "h", "d", "mmd")
    assert "checksum" in caplog.text
    torch.testing.assert_close(second, first, rtol=0, atol=0)  # regenerated (seeded per chunk), not read
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["num_samples"] == 12 and manifest["attack"]["eps"] == 0.1
    # another attack configuration regenerates too
    other = load_or_generate(model, x, y, AttackSpec(name="pgd", eps=0.05, step_size=0.05, steps=2, batch_size=5),
                             path, "h", "d", "mmd")
    assert (other - x).abs().amax() <= 0.05 + 1e-6


@pytest.fixture(scope="module")
def defense(tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import tiny_config
    from pipeline.paths import RunPaths
    from pipeline.stages import run_pipeline

    cfg = tiny_config(tmp_path_factory.mktemp("defense"))
    run_pipeline(cfg)
    return load_defense(RunPaths(cfg.run.dir).defense)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: torch.full((4, 1, 8, 8), float("nan")), "NaN"),
        (lambda: torch.full((4, 1, 8, 8), float("inf")), "NaN or inf"),
        (lambda: torch.rand(4, 1, 8, 8) * 255, "range"),
        (lambda: -torch.rand(4, 1, 8, 8), "range"),
        (lambda: torch.rand(4, 3, 8, 8), "shape"),
        (lambda: torch.rand(4, 1, 32, 32), "shape"),
        (lambda: torch.rand(1, 8, 8), "shape"),
        (lambda: torch.randint(0, 2, (4, 1, 8, 8)), "floating-point"),
    ],
)
def test_defense_rejects_bad_inputs(defense, make, message):
    with pytest.raises(InvalidInputError, match=message):
        defense(make())


def test_defense_rejects_a_batch_of_one(defense):
    with pytest.raises(ValueError, match="at least 2"):
        defense(torch.rand(1, 1, 8, 8))


def test_load_defense_errors(tmp_path, defense):
    with pytest.raises(FileNotFoundError, match="train.py pipeline"):
        load_defense(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(IncompatibleFileError):
        load_defense(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(IncompatibleFileError, match="header"):
        load_defense(tmp_path / "other.pt")
    defense.save(tmp_path / "d.pt")
    payload = torch.load(tmp_path / "d.pt", weights_only=True)
    payload["state_dict"]["classifier.head.weight"] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "bad_shapes.pt")
    with pytest.raises(IncompatibleFileError, match="does not match"):
        load_defense(tmp_path / "bad_shapes.pt")


def test_labels_outside_the_class_range_are_refused():
    from datamodules import DigitsDataModule
    from datamodules.base import DataError

    class BadLabels(DigitsDataModule):
        def load(self):  # type: ignore[no-untyped-def]
            x, y, _, _ = super().load()
            y[5] = 10
            return x, y, None, None

    with pytest.raises(DataError, match=r"Labels must lie in \[0, 10\)"):
        BadLabels().setup()
