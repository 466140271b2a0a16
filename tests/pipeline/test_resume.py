"""A training run killed with SIGKILL mid-epoch and resumed ends with exactly the uninterrupted weights."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dataclasses import replace

from pipeline.checkpoints import read_checkpoint
from pipeline.config import dump_config
from pipeline.paths import RunPaths
from pipeline.stages import run_stage
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "scripts" / "slow_stage.py"


def _global_step(path: Path) -> int:
    try:
        return read_checkpoint(path, "denoiser")["global_step"]
    except Exception:  # not written yet
        return -1


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_config(tmp_path, "a")
    cfg = replace(cfg, trainer={**cfg.trainer, "deterministic": True}, run=replace(cfg.run, checkpoint_every_n_steps=2),
                  denoiser=replace(cfg.denoiser, epochs=2))  # 9 steps per epoch (450 pairs, batch 50)
    run_stage(cfg, "classifier")
    run_stage(cfg, "kernel")
    shutil.copytree(cfg.run.dir, tmp_path / "b")  # the same classifier, kernel and AE caches

    run_stage(cfg, "denoiser")  # uninterrupted, in this process
    reference = read_checkpoint(RunPaths(cfg.run.dir).last("denoiser"), "denoiser")

    cfg = replace(cfg, run=replace(cfg.run, name="b"))
    config = tmp_path / "b.yaml"
    config.write_text(dump_config(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    last = RunPaths(cfg.run.dir).last("denoiser")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(config), "denoiser", "0.3"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _global_step(last) < 12 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    killed_at = _global_step(last)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert 9 < killed_at < 18 and killed_at % 9 != 0, killed_at  # mid-way through the second epoch
    assert not RunPaths(cfg.run.dir).done("denoiser").exists()

    resumed = subprocess.run([sys.executable, str(SCRIPT), str(config), "denoiser", "0", "--resume"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = read_checkpoint(last, "denoiser")
    assert final["global_step"] == reference["global_step"] == 18
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], value, rtol=0, atol=0, msg=name)
