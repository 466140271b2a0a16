"""The pieces of diffusion purification: the score, the expected perturbation score, the reverse steps, and SSNI's
map from EPS norms to timesteps (:mod:`dad.diffusion.purifiers` assembles them).

Diffusion-based purification with a fixed timestep, and SSNI's sample-specific timesteps.

Diffusion purification (DiffPure, Nie et al. 2022) diffuses an input to a timestep ``t*``, drowning an
adversarial perturbation in Gaussian noise, then runs the reverse process back to a clean-looking image.
SSNI (Sun et al., ICML 2025, "Sample-specific Noise Injection for Diffusion-based Adversarial
Purification") gives each sample its own timestep: the expected perturbation score (EPS, the score
averaged over small timesteps) has a larger norm on adversarial inputs, so those get more noise and
clean inputs less, which keeps clean accuracy higher.

Images are in [0, 1] outside and ``2x - 1`` (DDPM's [-1, 1]) inside. Everything is differentiable in
the input: for DDIM also through the per-sample timestep ``t(x)``, since ``alpha_bar`` is interpolated
between integer steps (:class:`~dad.diffusion.schedule.DiffusionSchedule`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from dad.diffusion.schedule import DiffusionSchedule, per_sample

__all__ = [
    "Sampler", "Mapping", "SAMPLERS", "MAPPINGS", "score", "eps_timesteps", "expected_perturbation_score",
    "ddpm_step", "ddim_step", "map_timesteps",
]

Sampler = Literal["ddpm", "ddim"]
Mapping = Literal["sigmoid", "linear"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
MAPPINGS: tuple[str, ...] = ("sigmoid", "linear")


def score(model: nn.Module, schedule: DiffusionSchedule, x_model: Tensor, t: Tensor) -> Tensor:
    """The score ``grad log p_t(x) = -eps_theta(x, t) / sqrt(1 - alpha_bar_t)`` of an epsilon-prediction model.

    Args:
        model: ``eps_theta(x, t)``.
        schedule: the model's noise schedule.
        x_model: images in model space, shape (B, ...).
        t: per-sample timesteps in (0, T], shape (B,) (at ``t = 0`` the score is undefined).
    """
    return -model(x_model, t) / per_sample(schedule.sigma(t).to(x_model.dtype), x_model)


def eps_timesteps(num_timesteps: int = 10, max_timestep: float = 20.0) -> Tensor:
    """The EPS timesteps ``t_k = t_S k / K`` for ``k = 1..K``: spread uniformly over ``(0, t_S]``."""
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"Expected `num_timesteps` to be a positive int, got {num_timesteps!r}")
    if not max_timestep > 0:
        raise ValueError(f"Expected `max_timestep` > 0, got {max_timestep}")
    return torch.arange(1, num_timesteps + 1, dtype=torch.float64) * (max_timestep / num_timesteps)  # cpu: a buffer


def expected_perturbation_score(model: nn.Module, schedule: DiffusionSchedule, x: Tensor,
                                timesteps: Tensor | None = None) -> Tensor:
    """Norm of the expected perturbation score ``EPS(x) = mean_k s(x, t_k)``, one value per sample.

    The score network is applied to the input itself as if it were ``x_t`` (no noise is added): at small
    timesteps the score of a clean image is small, while an adversarial perturbation, which does not lie
    on the data manifold, gets a large one. All ``K`` timesteps go through the network in one batch.

    Args:
        model: ``eps_theta(x, t)``.
        schedule: the model's noise schedule.
        x: images in [0, 1], shape (B, C, H, W).
        timesteps: the ``K`` timesteps, shape (K,), in (0, T]; None: :func:`eps_timesteps` (K = 10, t_S = 20).

    Returns:
        ``||EPS(x)||_2`` per sample, shape (B,), differentiable in ``x``.
    """
    timesteps = (eps_timesteps() if timesteps is None else timesteps).to(x)
    batch, k = x.shape[0], timesteps.shape[0]
    x_model = (2.0 * x - 1.0).repeat(k, *([1] * (x.ndim - 1)))
    scores = score(model, schedule, x_model, timesteps.repeat_interleave(batch))
    return torch.linalg.vector_norm(scores.reshape(k, batch, -1).mean(dim=0), dim=1)


def ddpm_step(model: nn.Module, schedule: DiffusionSchedule, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """One ancestral DDPM step ``x_t -> x_{t-1}`` with the posterior variance ``beta~_t``.

    ``x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sqrt(beta~_t) z`` with
    ``beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``, which is 0 at ``t = 1``.

    Args:
        model: ``eps_theta(x, t)``.
        schedule: the model's noise schedule.
        x_t: diffused images in model space, shape (B, ...).
        t: per-sample integer timesteps in [1, T], shape (B,).
        noise: the standard Gaussian ``z``, the shape of ``x_t``.
    """
    index = t.long() - 1
    beta, alpha, ab = (per_sample(buf[index].to(x_t.dtype), x_t)
                       for buf in (schedule.betas, schedule.alphas, schedule.alpha_bars))
    ab_prev = per_sample(schedule.alpha_bar(index).to(x_t.dtype), x_t)
    eps = model(x_t, t.to(x_t.dtype))
    mean = (x_t - beta / (1.0 - ab).sqrt() * eps) / alpha.sqrt()
    return mean + (beta * (1.0 - ab_prev) / (1.0 - ab)).sqrt() * noise


def ddim_step(model: nn.Module, schedule: DiffusionSchedule, x_t: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One deterministic DDIM step (eta = 0) from real-valued ``t`` to ``t_next < t``.

    ``x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``, ``x_next = sqrt(ab_next) x0 + sqrt(1 - ab_next) eps``
    (Song et al. 2021, eq. 12), with ``ab`` the interpolated ``alpha_bar``; a step to ``t_next = 0``
    returns the predicted ``x0``.

    Args:
        model: ``eps_theta(x, t)``.
        schedule: the model's noise schedule.
        x_t: diffused images in model space, shape (B, ...).
        t, t_next: per-sample timesteps in [0, T], shape (B,).
    """
    def coefficients(timesteps: Tensor) -> tuple[Tensor, Tensor]:
        ab = per_sample(schedule.alpha_bar(timesteps).to(x_t.dtype), x_t)
        return ab.sqrt(), per_sample(schedule.sigma(timesteps).to(x_t.dtype), x_t)

    (scale, sigma), (scale_next, sigma_next) = coefficients(t), coefficients(t_next)
    eps = model(x_t, t.to(x_t.dtype))
    return scale_next * (x_t - sigma * eps) / scale + sigma_next * eps


def map_timesteps(norms: Tensor, mu: Tensor | float, tau: Tensor | float, t_max: float, mapping: Mapping,
                  slope: float = 3.0) -> Tensor:
    """SSNI's per-sample timesteps from EPS norms: increasing in the norm, within ``[0, t_max]``.

    With ``z = (||EPS(x)|| - mu) / tau`` (the norm standardised by the clean calibration statistics):

    - ``sigmoid`` (SSNI-N): ``t(x) = t_max / (1 + exp(-z))``;
    - ``linear`` (SSNI-L): ``t(x) = clip(t_max (0.5 + z / (2 slope)), 0, t_max)``, the straight line through
      ``(mu, t_max / 2)`` that spans ``[0, t_max]`` over ``mu +- slope tau``.

    Both give ``t_max / 2`` at the mean clean norm. ``t_max = t* + b`` in the paper's notation.

    Args:
        norms: EPS norms, shape (B,).
        mu, tau: mean and standard deviation (> 0) of the clean calibration norms.
        t_max: the largest timestep, ``t* + b``.
        mapping: ``sigmoid`` or ``linear``.
        slope: the linear map's half-range in standard deviations.
    """
    z = (norms - mu) / tau
    if mapping == "sigmoid":
        return t_max * torch.sigmoid(z)
    if mapping == "linear":
        return (t_max * (0.5 + z / (2.0 * slope))).clamp(0.0, t_max)
    raise ValueError(f"Expected `mapping` in {MAPPINGS}, got {mapping!r}")
