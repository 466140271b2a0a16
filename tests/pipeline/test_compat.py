"""Files written before the architecture change: defenses load, stage checkpoints fail with what to re-run."""

from __future__ import annotations

import pytest
import torch

from dad.defense import load_defense
from pipeline.checkpoints import StageCheckpointError, read_checkpoint
from pipeline.cli import main_train
from pipeline.paths import RunPaths
from pipeline.stages import run_pipeline
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg = tiny_config(tmp_path_factory.mktemp("compat"))
    run_pipeline(cfg)
    return cfg


def test_a_version_1_defense_file_still_loads(finished, tmp_path):
    paths = RunPaths(finished.run.dir)
    payload = torch.load(paths.defense, weights_only=True)
    networks = payload.pop("networks")
    legacy = {**payload, "version": 1, "train_features": False, "shares_features": True,
              "specs": {"classifier": networks["classifier"], "feature_extractor": None,
                        "denoiser": networks["denoiser"]}}
    torch.save(legacy, tmp_path / "v1.pt")
    old, new = load_defense(tmp_path / "v1.pt"), load_defense(paths.defense)
    assert old.shares_features and old.specs == new.specs
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
