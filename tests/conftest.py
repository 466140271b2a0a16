"""Shared fixtures: a tiny digits configuration that runs the whole pipeline in seconds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from dad.attacks import AttackSpec
from dad.defense import DADDefense
from dad.denoisers import UNetDenoiser
from dad.detector import MMDDetector
from dad.kernels import SemanticKernel
from dad.models import create_model
from dad.purification import DenoiserPurifier
from dad.sample_detector import SampleDetector
from datamodules.settings import DataSettings
from pipeline.eval_settings import EvalSettings
from lightning_modules.classifier import ClassifierSettings
from lightning_modules.denoiser import DenoiserSettings
from lightning_modules.kernel import KernelSettings
from pipeline.config import DefenseSettings, PipelineConfig, RunSettings

# Two cores: one intra-op thread per process avoids OpenMP oversubscription stalls when several
# processes (DDP tests, data workers) share the machine.
torch.set_num_threads(1)

TINY_ATTACK: dict[str, Any] = {"name": "pgd", "norm": "linf", "eps": 0.2, "step_size": 0.05, "steps": 3}
TINY_TRAINER: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                                "log_every_n_steps": 1}


def tiny_config(root: Path, name: str = "tiny", **sections: Any) -> PipelineConfig:
    """A pipeline configuration on a 700-image digits subset with a few steps per stage."""
    cfg = PipelineConfig(
        run=RunSettings(name=name, root=str(root), seed=0),
        data=DataSettings(dataset="digits", mmd_per_class=5, val_size=100, test_size=100, subset=700, batch_size=64),
        trainer=dict(TINY_TRAINER),
        classifier=ClassifierSettings(model="small_cnn", epochs=2, lr=3e-3),
        attack=AttackSpec(**TINY_ATTACK, batch_size=64),
        kernel=KernelSettings(steps=6, lr=1e-2),
        denoiser=DenoiserSettings(epochs=1, batch_size=50, milestones=[], noise_std=0.1,
                                  net={"enc_widths": [8, 16], "enc_depths": [1, 1], "dec_widths": [8],
                                       "dec_depths": [1]}),
        defense=DefenseSettings(reference_size=25, calibration_batches=400, batch_size=25),
        eval=EvalSettings(
            attacks={
                "pgd_linf": AttackSpec(**TINY_ATTACK),
                "adaptive": AttackSpec(**TINY_ATTACK, threat="defense", eot_samples=2),
            },
            detection_batch_sizes=[10, 25],
            random_batches=100,
            mixed_attacks=["pgd_linf"],
            sanity_samples=50,
        ),
    )
    return replace(cfg, **sections)


def tiny_defense(batch_sizes: list[int], noise_std: float = 0.1) -> DADDefense:
    """A tiny calibrated defense on 8x8 random images (every routing available), random weights seeded 0."""
    torch.manual_seed(0)
    classifier = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    kernel = SemanticKernel(classifier, sigma_phi=10.0, sigma_q=128.0)
    detector = MMDDetector(kernel, torch.rand(20, 1, 8, 8))
    sample_detector = SampleDetector(kernel, torch.rand(16, 1, 8, 8), torch.rand(16, 1, 8, 8))
    denoiser = UNetDenoiser(in_channels=1, enc_widths=(4, 8), enc_depths=(1, 1), dec_widths=(4,), dec_depths=(1,))
    defense = DADDefense(classifier, detector, DenoiserPurifier(denoiser.eval(), noise_std),
                         sample_detector=sample_detector)
    defense.calibrate(torch.rand(60, 1, 8, 8), batch_sizes, num_batches=100)
    return defense.eval()


@pytest.fixture
def tiny(tmp_path: Path) -> PipelineConfig:
    return tiny_config(tmp_path)
