"""Diffusion-based purification with a fixed timestep, and SSNI's sample-specific timesteps.

Diffusion purification (DiffPure, Nie et al. 2022) diffuses an input to a timestep ``t*``, drowning an
adversarial perturbation in Gaussian noise, then runs the reverse process back to a clean-looking image.
SSNI (Sun et al., ICML 2025, "Sample-specific Noise Injection for Diffusion-based Adversarial
Purification") gives each sample its own timestep: the expected perturbation score (EPS, the score
averaged over small timesteps) has a larger norm on adversarial inputs, so those get more noise and
clean inputs less, which keeps clean accuracy higher. Both are :class:`~dad.purification.Purifier` kinds
(``fixed``, ``ssni``); the steps they assemble are :mod:`dad.diffusion.steps`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpointed

from dad.diffusion.schedule import DiffusionSchedule
from dad.diffusion.steps import (
    MAPPINGS, SAMPLERS, Mapping, Sampler, ddim_step, ddpm_step, eps_timesteps, expected_perturbation_score,
    map_timesteps,
)
from dad.diffusion.unet import ScoreUNet
from dad.purification import Purifier, register_purifier

__all__ = ["DiffusionPurifier", "SSNIPurifier"]


@register_purifier("fixed")
class DiffusionPurifier(Purifier):
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

    def spec(self) -> dict[str, Any]:
        """``kind``, the score network's and the schedule's configs, ``t_star``, ``sampler``, ``ddim_steps``."""
        if not isinstance(self.model, ScoreUNet):
            raise ValueError(f"Expected a purifier around a ScoreUNet to save, got {type(self.model).__name__}")
        return {"kind": self.kind, "score_net": dict(self.model.config), "schedule": dict(self.schedule.config),
                "t_star": self.t_star, "sampler": self.sampler, "ddim_steps": self.ddim_steps}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], checkpoint: bool = False) -> Purifier:
        return cls(ScoreUNet(**spec["score_net"]), DiffusionSchedule(**spec["schedule"]), spec["t_star"],
                   spec["sampler"], spec["ddim_steps"], checkpoint)

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


@register_purifier("ssni")
class SSNIPurifier(Purifier):
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

    def runs(self, x: Tensor, count: int) -> Tensor:
        """``count`` independent purifications of ``x``, the same as ``count`` calls of the purifier (the same random
        numbers in the same order); ``t(x)`` does not depend on the noise and is computed once. The reverse process
        draws noise at every step, so its runs stay one after another (batching them would change the draws)."""
        t = self.timesteps(x)
        return torch.stack([self.purifier.purify(x, t) for _ in range(count)])

    def adaptive_term(self, x: Tensor) -> Tensor:
        """The standardised EPS norm, the quantity SSNI keys on (an AE that lowers it gets a small timestep)."""
        return self.standardized_norms(x)

    def spec(self) -> dict[str, Any]:
        """The diffusion purifier's spec with ``kind`` ``ssni``, ``bias``, ``mapping``, ``slope`` and the EPS grid."""
        return {**self.purifier.spec(), "kind": self.kind, "bias": self.bias, "mapping": self.mapping,
                "slope": self.slope, "eps_num_timesteps": self.eps_num_timesteps,
                "eps_max_timestep": self.eps_max_timestep}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], checkpoint: bool = False) -> Purifier:
        base = DiffusionPurifier.from_spec(spec, checkpoint)
        return cls(base, spec["bias"], spec["mapping"], spec["slope"], spec["eps_num_timesteps"],  # type: ignore
                   spec["eps_max_timestep"])
