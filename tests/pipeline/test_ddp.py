"""DDP (2 CPU processes, gloo) against a single process: statistics, gradients and AE caches agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataclasses import replace

from dad.attacks import AttackSpec
from datamodules import DataSettings, DigitsDataModule
from datamodules.ae_cache import load_or_generate
from pipeline.config import load_config
from pipeline.paths import RunPaths
from pipeline.networks import RunNetworks
from pipeline.stages import run_stage
from tests.conftest import tiny_config

SCRIPT = Path(__file__).parent / "scripts" / "one_step.py"
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ddp


@pytest.fixture(scope="module")
def run_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The config.yaml of a tiny run whose classifier and kernel stages are done."""
    cfg = tiny_config(tmp_path_factory.mktemp("ddp_run"))
    run_stage(cfg, "classifier")
    run_stage(cfg, "kernel")
    return str(RunPaths(cfg.run.dir).config)


def _run(stage: str, mode: str, run_config: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(SCRIPT), stage, mode, run_config, str(out)], cwd=out, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("stage", ["kernel", "denoiser"])
def test_one_ddp_step_equals_single_process(stage, run_config, tmp_path):
    _run(stage, "single", run_config, tmp_path)
    _run(stage, "ddp", run_config, tmp_path)
    single = torch.load(tmp_path / f"{stage}_single_rank0.pt", weights_only=True)
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"{stage}_ddp_rank{rank}.pt", weights_only=True)
        if stage == "kernel":  # the loss is -J of the global batch on every rank
            torch.testing.assert_close(ddp["loss"], single["loss"], rtol=1e-5, atol=1e-6)
        assert set(ddp["grads"]) == set(single["grads"]) and single["grads"]
        for name, grad in single["grads"].items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sharded_ae_generation_matches_one_process(run_config, tmp_path):
    _run("ae", "ddp", run_config, tmp_path)
    from tests.pipeline.scripts.one_step import ATTACK

    cfg = load_config(run_config)
    classifier = RunNetworks(cfg, RunPaths(Path(run_config).parent)).classifier
    base = DigitsDataModule(DataSettings(mmd_per_class=5, val_size=100, test_size=100, subset=700))
    clean, labels = base.split_tensors("mmd")
    single = load_or_generate(classifier.eval(), clean, labels, ATTACK, tmp_path / "single" / "mmd.pt", "hash",
                              base.splits.digest(), "mmd")
    merged = torch.load(tmp_path / "aes_ddp" / "mmd.pt", weights_only=True)["adv"]
    assert merged.shape == clean.shape == (50, 1, 8, 8)
    torch.testing.assert_close(merged, single, rtol=0, atol=0)
    assert (merged - clean).abs().amax() <= ATTACK.eps + 1e-6
    assert not list((tmp_path / "aes_ddp").glob("*.shard*"))  # shards merged and removed
    assert isinstance(ATTACK, AttackSpec)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_failing_rank_fails_the_run_quickly(rank, tmp_path):
    from pipeline.config import dump_config

    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(tiny_config(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    script = Path(__file__).parent / "scripts" / "failing_rank.py"
    result = subprocess.run([sys.executable, str(script), str(config), str(rank)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)  # a hang would exceed this
    assert result.returncode != 0
    assert f"rank {rank} failed on purpose" in result.stderr


def test_ddp_evaluation_counts_every_sample_once_and_matches_one_process(tmp_path):
    import json
    import shutil

    from pipeline.config import dump_config
    from evaluation.runner import evaluate
    from pipeline.stages import run_pipeline

    cfg = tiny_config(tmp_path, "single")
    # 3 full batches of 25 and one of 15: uneven shares across the 2 ranks
    cfg = replace(cfg, eval=replace(cfg.eval, max_test=90, plots=False))
    run_pipeline(cfg)
    shutil.copytree(cfg.run.dir, tmp_path / "ddp")
    single = evaluate(cfg)

    cfg = replace(cfg, run=replace(cfg.run, name="ddp"), trainer={**cfg.trainer, "strategy": "ddp", "devices": 2})
    (tmp_path / "ddp" / "config.yaml").write_text(dump_config(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(REPO / "eval.py"), "--run", str(tmp_path / "ddp")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "report.json").read_text())
    single = json.loads(json.dumps(single))
    assert ddp["num_test"] == single["num_test"] == 90
    for key in ("clean_acc", "robust_acc", "worst_case", "detection", "sanity"):
        assert ddp[key] == single[key], key
    assert not list((tmp_path / "ddp" / "eval_state").glob("*.rank*"))  # shares merged into one state
