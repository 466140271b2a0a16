"""Diffusion-based adversarial purification: DDPM schedule, small score U-Net, DiffPure-style and SSNI purifiers."""

from dad.diffusion.purifiers import DiffusionPurifier, SSNIPurifier
from dad.diffusion.schedule import DiffusionSchedule, per_sample
from dad.diffusion.steps import (
    MAPPINGS,
    SAMPLERS,
    Mapping,
    Sampler,
    ddim_step,
    ddpm_step,
    eps_timesteps,
    expected_perturbation_score,
    map_timesteps,
    score,
)
from dad.diffusion.storage import load_purifier, save_purifier
from dad.diffusion.unet import ScoreUNet, timestep_embedding

__all__ = [
    "DiffusionSchedule", "per_sample", "ScoreUNet", "timestep_embedding", "score", "eps_timesteps",
    "expected_perturbation_score", "ddpm_step", "ddim_step", "map_timesteps", "DiffusionPurifier", "SSNIPurifier",
    "save_purifier", "load_purifier", "Sampler", "Mapping", "SAMPLERS", "MAPPINGS",
]
