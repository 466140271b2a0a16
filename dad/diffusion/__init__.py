"""Diffusion-based adversarial purification: DDPM schedule, small score U-Net, DiffPure-style and SSNI purifiers."""

from dad.diffusion.purifiers import (
    MAPPINGS,
    SAMPLERS,
    DiffusionPurifier,
    Mapping,
    Purifier,
    Sampler,
    SSNIPurifier,
    build_purifier,
    ddim_step,
    ddpm_step,
    eps_timesteps,
    expected_perturbation_score,
    load_purifier,
    map_timesteps,
    purifier_spec,
    save_purifier,
    score,
)
from dad.diffusion.schedule import DiffusionSchedule, per_sample
from dad.diffusion.unet import ScoreUNet, timestep_embedding

__all__ = [
    "DiffusionSchedule", "per_sample", "ScoreUNet", "timestep_embedding", "score", "eps_timesteps",
    "expected_perturbation_score", "ddpm_step", "ddim_step", "map_timesteps", "DiffusionPurifier", "SSNIPurifier",
    "Purifier", "purifier_spec", "build_purifier", "save_purifier", "load_purifier", "Sampler", "Mapping", "SAMPLERS",
    "MAPPINGS",
]
