"""The GPU check's script, run on the CPU with tiny budgets: its steps run, pass and leave their figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.device_agreement import TOLERANCES

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_its_steps_and_writes_its_figures(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    steps = ["cpu_gpu_agreement", "classifier_speed", "cifar10_cpu_training"]
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--accelerator", "cpu", "--quick", "--results",
                           str(tmp_path), "--only", *steps], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in result["steps"]] == steps and all(s["passed"] for s in result["steps"])
    assert result["passed"] and result["machine"]["device"] == "cpu"
    assert result["classifier_over_bare"] > 0 and result["stage_images_per_second"] > 0
    assert set(result["cifar10_cpu_training_seconds"]) == {"classifier", "kernel", "denoiser", "total"}
    assert set(result["cpu_gpu_agreement"]) == set(TOLERANCES)  # CPU against CPU here: identical
    assert all(difference == 0.0 for difference in result["cpu_gpu_agreement"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_the_gpu_check_refuses_to_run_without_a_gpu() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
