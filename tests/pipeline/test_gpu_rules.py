"""What breaks on GPUs, caught on the CPU: collectives after a Trainer's teardown under single-process DDP.

See :mod:`tests.collectives`: a ``strategy="ddp", devices=1`` gloo run syncs like a real DDP run, and the guard
makes any collective issued outside a Trainer's life fail the run, as NCCL would on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.config import dump_config
from pipeline.paths import RunPaths
from tests.conftest import tiny_config
from tests.pipeline.test_purification import PURIFIER, SCORE

SCRIPT = Path(__file__).parent / "scripts" / "ddp_one_process.py"
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ddp


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_guard_catches_a_metric_computed_after_fit(tmp_path: Path) -> None:
    result = _script("metric_after_fit", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_stage_and_eval_under_one_process_ddp_bf16_issue_no_collective_after_teardown(tmp_path: Path) -> None:
    cfg = replace(tiny_config(tmp_path), score=SCORE, purifier=PURIFIER)
    cfg = replace(cfg, eval=replace(cfg.eval, max_test=50, plots=False, sanity_samples=25))
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(cfg))
    result = _script("pipeline", str(config), "bf16-mixed", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = RunPaths(cfg.run.dir)
    for stage in ("classifier", "kernel", "denoiser", "defense", "score", "purifier"):
        assert paths.done(stage).is_file(), stage
    report = json.loads((paths.root / "report.json").read_text())
    assert report["num_test"] == 50 and report["worst_case"]
