"""Diffusion-based purification with a fixed timestep, and SSNI's sample-specific timesteps.

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

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpointed

from dad.diffusion.schedule import DiffusionSchedule, per_sample

__all__ = [
    "Sampler", "Mapping", "SAMPLERS", "MAPPINGS", "score", "eps_timesteps", "expected_perturbation_score",
    "ddpm_step", "ddim_step", "map_timesteps", "DiffusionPurifier", "SSNIPurifier", "Purifier",
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


class DiffusionPurifier(nn.Module):
    """Diffuse to a timestep, then denoise with the reverse process: images in [0, 1] in and out.

    ``forward`` uses the fixed ``t_star`` for every sample; :meth:`purify` takes one timestep per sample.
    The ``ddpm`` sampler runs the ancestral steps from ``t`` down to 1 (real timesteps are rounded to the
    nearest integer, so ``t`` receives no gradient); ``ddim`` runs ``ddim_steps`` deterministic steps from
    each sample's own ``t`` to 0 over evenly spaced, possibly real, timesteps, differentiable in ``t``.
    Fresh Gaussian noise is drawn on every call (seed the global generator for repeatable outputs). The
    network's mode is left alone: put the purifier in eval mode if the network has dropout.

    Args:
        model: the epsilon-prediction network ``eps_theta(x, t)`` (a :class:`~dad.diffusion.unet.ScoreUNet`
            to be saved by :func:`save_purifier`).
        schedule: its noise schedule.
        t_star: the fixed timestep, in [1, T].
        sampler: ``ddpm`` or ``ddim``.
        ddim_steps: the number of DDIM steps.
        checkpoint: recompute each reverse step in the backward pass (``torch.utils.checkpoint``) instead of
            storing its activations, so full gradients through the reverse process fit in memory.
    """

    def __init__(self, model: nn.Module, schedule: DiffusionSchedule, t_star: int = 100, sampler: Sampler = "ddpm",
                 ddim_steps: int = 10, checkpoint: bool = False) -> None:
        super().__init__()
        if not isinstance(t_star, int) or not 1 <= t_star <= schedule.num_steps:
            raise ValueError(f"Expected `t_star` to be an int in [1, {schedule.num_steps}], got {t_star!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"Expected `sampler` in {SAMPLERS}, got {sampler!r}")
        if not isinstance(ddim_steps, int) or ddim_steps < 1:
            raise ValueError(f"Expected `ddim_steps` to be a positive int, got {ddim_steps!r}")
        self.model = model
        self.schedule = schedule
        self.t_star = t_star
        self.sampler = sampler
        self.ddim_steps = ddim_steps
        self.checkpoint = checkpoint

    def forward(self, x: Tensor) -> Tensor:
        """Purified images in [0, 1], every sample diffused to ``t_star``."""
        return self.purify(x, x.new_full((x.shape[0],), float(self.t_star)))

    def runs(self, x: Tensor, count: int) -> list[Tensor]:
        """``count`` independent purifications of ``x`` (what ``count`` calls of the purifier give)."""
        return [self(x) for _ in range(count)]

    def purify(self, x: Tensor, t: Tensor) -> Tensor:
        """Purify each sample from its own timestep; ``t = 0`` leaves a sample unchanged.

        Args:
            x: images in [0, 1], shape (B, C, H, W).
            t: per-sample timesteps in [0, T], shape (B,), real-valued.

        Returns:
            Purified images in [0, 1], the shape of ``x``.
        """
        if t.shape != (x.shape[0],):
            raise ValueError(f"Expected per-sample timesteps `t` of shape ({x.shape[0]},), got {tuple(t.shape)}")
        if bool(((t < 0) | (t > self.schedule.num_steps)).any()):
            raise ValueError(f"Expected `t` in [0, {self.schedule.num_steps}], got range "
                             f"[{t.min().item():.4g}, {t.max().item():.4g}]")
        if self.sampler == "ddpm":
            t = t.detach().round()
        x_t = self.schedule.diffuse(2.0 * x - 1.0, t, torch.randn_like(x))
        x0 = self._ddpm(x_t, t.long()) if self.sampler == "ddpm" else self._ddim(x_t, t)
        return ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)

    def _run(self, step: Callable[..., Tensor], *args: Tensor) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return checkpointed(step, *args, use_reentrant=False)
        return step(*args)

    def _ddpm(self, x: Tensor, t: Tensor) -> Tensor:
        """Ancestral steps from each sample's ``t`` to 0; a sample waits until the loop reaches its ``t``."""
        step_fn = partial(ddpm_step, self.model, self.schedule)
        own = t.cpu()  # one transfer: which samples are active at each step is known upfront
        for step in range(int(own.max()), 0, -1):
            active = own >= step
            # the noise is drawn outside the (checkpointed) step so that recomputation repeats it
            if bool(active.all()):
                x = self._run(step_fn, x, t.new_full(t.shape, step), torch.randn_like(x))
            else:
                index = active.nonzero().squeeze(1).to(x.device)
                chunk = x[index]
                stepped = self._run(step_fn, chunk, t.new_full(index.shape, step), torch.randn_like(chunk))
                x = x.index_put((index,), stepped)
        return x

    def _ddim(self, x: Tensor, t: Tensor) -> Tensor:
        """``ddim_steps`` steps over ``t (S - j) / S``, ``j = 0..S``: each sample from its own ``t`` to 0."""
        step_fn, steps = partial(ddim_step, self.model, self.schedule), self.ddim_steps
        for j in range(steps):
            x = self._run(step_fn, x, t * ((steps - j) / steps), t * ((steps - j - 1) / steps))
        return x


class SSNIPurifier(nn.Module):
    """SSNI: diffusion purification with the sample-specific timestep ``t(x)`` of :func:`map_timesteps`.

    ``t(x)`` maps the norm of the expected perturbation score (:func:`expected_perturbation_score`) into
    ``[0, t* + b]``, through a sigmoid (SSNI-N) or a clipped line (SSNI-L); ``mu`` and ``tau`` are the mean
    and standard deviation of clean images' norms, set by :meth:`calibrate`. ``t(x)`` is real-valued and
    differentiable in ``x``; the purifier's sampler then takes each sample from its own ``t(x)``
    (DDIM: differentiably; DDPM: rounded).

    Args:
        purifier: the diffusion purifier (its model, schedule, ``t_star``, sampler).
        bias: ``b``, with ``0 < t_star + b <= T``.
        mapping: ``sigmoid`` (SSNI-N) or ``linear`` (SSNI-L).
        slope: the linear map spans ``[0, t* + b]`` over ``mu +- slope * tau``.
        eps_num_timesteps, eps_max_timestep: ``K`` and ``t_S`` of the EPS estimate (:func:`eps_timesteps`).
    """

    mu: Tensor
    tau: Tensor

    def __init__(self, purifier: DiffusionPurifier, bias: float = 0.0, mapping: Mapping = "sigmoid",
                 slope: float = 3.0, eps_num_timesteps: int = 10, eps_max_timestep: float = 20.0) -> None:
        super().__init__()
        num_steps = purifier.schedule.num_steps
        if not 0.0 < purifier.t_star + bias <= num_steps:
            raise ValueError(f"Expected 0 < `t_star` + `bias` <= {num_steps}, got {purifier.t_star} + {bias}")
        if mapping not in MAPPINGS:
            raise ValueError(f"Expected `mapping` in {MAPPINGS}, got {mapping!r}")
        if not slope > 0:
            raise ValueError(f"Expected `slope` > 0, got {slope}")
        if not 0.0 < eps_max_timestep <= num_steps:
            raise ValueError(f"Expected `eps_max_timestep` in (0, {num_steps}], got {eps_max_timestep}")
        self.eps_grid = eps_timesteps(eps_num_timesteps, eps_max_timestep)  # validates K, stays float64 on CPU
        self.purifier = purifier
        self.bias = float(bias)
        self.mapping = mapping
        self.slope = float(slope)
        self.eps_num_timesteps = eps_num_timesteps
        self.eps_max_timestep = float(eps_max_timestep)
        # NaN until calibrated: purifying before calibration is an error, not a silent default
        self.register_buffer("mu", torch.tensor(float("nan")))
        self.register_buffer("tau", torch.tensor(float("nan")))

    @property
    def t_max(self) -> float:
        """``t* + b``, the largest timestep ``t(x)`` can reach."""
        return self.purifier.t_star + self.bias

    def eps_norms(self, x: Tensor) -> Tensor:
        """``||EPS(x)||`` per sample, shape (B,), differentiable in ``x``."""
        return expected_perturbation_score(self.purifier.model, self.purifier.schedule, x, self.eps_grid)

    @torch.no_grad()
    def calibrate(self, clean: Tensor, batch_size: int = 256) -> None:
        """Set ``mu`` and ``tau`` to the mean and standard deviation of clean images' EPS norms.

        Args:
            clean: at least two clean images in [0, 1], shape (N, C, H, W).
            batch_size: images per forward pass.
        """
        if clean.shape[0] < 2:
            raise ValueError(f"Expected at least 2 clean calibration images, got {clean.shape[0]}")
        norms = torch.cat([self.eps_norms(chunk) for chunk in clean.split(batch_size)])
        std = norms.std()
        if not std > 0:
            raise ValueError(f"Expected clean EPS norms that vary, got standard deviation {std.item()}")
        self.mu.copy_(norms.mean())
        self.tau.copy_(std)

    def standardized_norms(self, x: Tensor) -> Tensor:
        """``(||EPS(x)|| - mu) / tau`` per sample: how far from the clean norms, in clean standard deviations."""
        if bool(self.mu.isnan()):
            raise RuntimeError("SSNIPurifier is not calibrated: call `calibrate(clean_images)` first")
        return (self.eps_norms(x) - self.mu) / self.tau

    def timesteps(self, x: Tensor) -> Tensor:
        """``t(x)`` per sample, real-valued in ``[0, t* + b]``, shape (B,), differentiable in ``x``."""
        return map_timesteps(self.standardized_norms(x), 0.0, 1.0, self.t_max, self.mapping, self.slope)

    def forward(self, x: Tensor) -> Tensor:
        """Purified images in [0, 1]: each sample diffused to its own ``t(x)`` and denoised."""
        return self.purifier.purify(x, self.timesteps(x))

    def runs(self, x: Tensor, count: int) -> list[Tensor]:
        """``count`` independent purifications of ``x``, the same as ``count`` calls of the purifier (the same random
        numbers in the same order); ``t(x)`` does not depend on the noise and is computed once."""
        t = self.timesteps(x)
        return [self.purifier.purify(x, t) for _ in range(count)]


Purifier = DiffusionPurifier | SSNIPurifier
