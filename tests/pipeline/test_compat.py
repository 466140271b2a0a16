"""Files written before the architecture change: defenses load, stage checkpoints fail with what to re-run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dad.defense_file import load_defense
from pipeline.checkpoints import StageCheckpointError, read_checkpoint
from pipeline.cli import main_train
from pipeline.paths import RunPaths
from pipeline.stages import run_pipeline
from tests.conftest import tiny_config

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg = tiny_config(tmp_path_factory.mktemp("compat"))
    run_pipeline(cfg)
    return cfg


def test_a_version_1_defense_file_still_loads(tmp_path):
    """Version 1 (before the kernel part of the specs, per-sample routing and the joint thresholds), made from
    the committed version-4 file by taking away what version 1 did not have."""
    payload = torch.load(DATA / "defense_v4.pt", weights_only=True)
    networks, _ = payload.pop("networks"), payload.pop("routing")  # version 1 routed by batch only
    state = {k: v for k, v in payload.pop("state_dict").items() if not k.startswith(("joint.", "sample_detector."))}
    legacy = {**payload, "version": 1, "train_features": False, "shares_features": True, "sample_score": None,
              "state_dict": state, "specs": {"classifier": networks["classifier"], "feature_extractor": None,
                                             "denoiser": networks["denoiser"]}}
    torch.save(legacy, tmp_path / "v1.pt")
    old, new = load_defense(tmp_path / "v1.pt"), load_defense(DATA / "defense_v4.pt")
    assert old.shares_features and old.specs == new.specs and old.sample_detector is None
    new.routing = old.routing = "batch"
    x = torch.rand(25, 1, 8, 8)
    torch.manual_seed(0)
    expected = new(x)
    torch.manual_seed(0)
    torch.testing.assert_close(old(x), expected)


def test_a_stage_checkpoint_of_the_earlier_format_names_the_stage_to_rerun(finished, tmp_path, capsys):
    paths = RunPaths(finished.run.dir)
    ckpt = torch.load(paths.product("kernel"), weights_only=True)
    del ckpt["dad_format"], ckpt["dad_networks"]
    torch.save(ckpt, paths.product("kernel"))
    with pytest.raises(StageCheckpointError, match=r"earlier version of dad .*run `python train.py kernel"):
        read_checkpoint(paths.product("kernel"), "kernel", "python train.py kernel --run.name tiny")
    code = main_train(["denoiser", "--config", str(paths.config), "--ckpt_path", "last"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "python train.py kernel" in err[0] and "earlier version" in err[0]
