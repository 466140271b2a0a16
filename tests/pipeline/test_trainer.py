"""The stage Trainers: the run's device, quiet output on GPUs as on CPUs, the kernel's step progress."""

from __future__ import annotations

import logging

import pytest
import torch

from callbacks import StepProgressBar
from pipeline.trainer import step_bar
from pipeline.trainer import DROPPED_PREFIXES, run_device, quiet_third_party
from tests.conftest import tiny_config

GPU_LINES = {
    "pytorch_lightning.accelerators.cuda": "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]",
    "lightning_fabric.utilities.rank_zero": "You are using a CUDA device ('NVIDIA H200') that has Tensor Cores. To "
                                            "properly utilize them, you should set `torch.set_float32_matmul_precision",
    "pytorch_lightning.utilities.rank_zero": "💡 Tip: For seamless cloud logging and experiment tracking, try ...",
}


def test_gpu_banners_and_tips_are_dropped_and_our_lines_kept(caplog: pytest.LogCaptureFixture) -> None:
    quiet_third_party()
    with caplog.at_level(logging.INFO):
        for name, line in GPU_LINES.items():
            logging.getLogger(name).info(line)
        logging.getLogger("pipeline.stages").info("kernel: J 0.1 -> 0.9 over 200 steps")
    assert [r.getMessage() for r in caplog.records] == ["kernel: J 0.1 -> 0.9 over 200 steps"]
    assert all(line.startswith(DROPPED_PREFIXES) for line in GPU_LINES.values())


def test_the_run_device_is_where_a_trainer_of_the_run_places_its_module() -> None:
    assert run_device({"accelerator": "cpu", "devices": 1}) == torch.device("cpu")
    assert run_device({}).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_kernel_stage_shows_one_bar_over_its_steps_unless_bars_are_off(tmp_path) -> None:
    cfg = tiny_config(tmp_path)
    assert step_bar(cfg) == []  # the tiny config turns progress bars off
    on = step_bar(type(cfg)(**{**cfg.__dict__, "trainer": {**cfg.trainer, "enable_progress_bar": True}}))
    assert len(on) == 1 and isinstance(on[0], StepProgressBar)


def test_the_kernel_bar_counts_steps(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from dataclasses import replace

    from pipeline.stages import run_stage

    cfg = tiny_config(tmp_path)
    run_stage(cfg, "classifier")
    run_stage(replace(cfg, trainer={**cfg.trainer, "enable_progress_bar": True}), "kernel")
    out = capsys.readouterr().out  # Lightning's bars write to stdout
    assert "Steps: 100%" in out and f"{cfg.kernel.steps}/{cfg.kernel.steps}" in out
    assert "Epoch" not in out
