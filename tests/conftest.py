"""Shared fixtures: a tiny digits configuration that runs the whole pipeline in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_modules.config import (
    ClassifierConfig, DataConfig, DefenseConfig, DenoiserConfig, EvalConfig, KernelConfig, PipelineConfig,
    RunConfig, TrainerConfig,
)

# Two cores: one intra-op thread per process avoids OpenMP oversubscription stalls when several
# processes (DDP tests, data workers) share the machine.
torch.set_num_threads(1)

TINY_ATTACK = {"name": "pgd", "norm": "linf", "eps": 0.2, "step_size": 0.05, "steps": 3, "batch_size": 64}


def tiny_config(root: Path, name: str = "tiny", **sections: object) -> PipelineConfig:
    """A pipeline configuration on a 700-image digits subset with a few steps per stage."""
    cfg = PipelineConfig(
        run=RunConfig(name=name, root=str(root), seed=0),
        data=DataConfig(dataset="digits", mmd_per_class=5, val_size=100, test_size=100, subset=700, batch_size=64),
        trainer=TrainerConfig(accelerator="cpu", devices=1, enable_progress_bar=False, log_every_n_steps=1),
        classifier=ClassifierConfig(model="small_cnn", epochs=2, lr=3e-3),
        attack=dict(TINY_ATTACK),
        kernel=KernelConfig(steps=6, lr=1e-2),
        denoiser=DenoiserConfig(epochs=1, batch_size=50, milestones=[], noise_std=0.1,
                                net={"enc_widths": [8, 16], "enc_depths": [1, 1], "dec_widths": [8], "dec_depths": [1]}),
        defense=DefenseConfig(reference_size=25, calibration_batches=400, batch_size=25),
        eval=EvalConfig(
            attacks={
                "pgd_linf": {**TINY_ATTACK, "threat": "classifier"},
                "adaptive": {**TINY_ATTACK, "threat": "defense", "eot_samples": 2},
            },
            detection_batch_sizes=[10, 25],
            random_batches=100,
        ),
    )
    for key, value in sections.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
def tiny(tmp_path: Path) -> PipelineConfig:
    return tiny_config(tmp_path)
