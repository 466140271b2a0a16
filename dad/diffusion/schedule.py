"""The DDPM noise schedule (Ho et al. 2020), with ``alpha_bar`` defined for real-valued timesteps too.

SSNI gives each sample its own diffusion timestep ``t(x)``, a smooth function of the input. An attack that
differentiates through ``t(x)`` needs ``alpha_bar(t)`` to be continuous and differentiable in ``t``, so
between two integer steps ``log alpha_bar`` is interpolated linearly (``alpha_bar`` is a product, so its
logarithm is the natural quantity to interpolate: at integers the interpolation is exact).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DiffusionSchedule", "per_sample"]

_MIN_VARIANCE = 1e-12


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample values ``(B,)`` to ``(B, 1, ..., 1)`` so they broadcast against ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


class DiffusionSchedule(nn.Module):
    """A linear beta schedule: ``beta_t`` from ``beta_start`` (t = 1) to ``beta_end`` (t = T), T steps.

    Step ``t`` (1-based, as in the DDPM paper) is stored at index ``t - 1`` of the buffers; ``alpha_bar(0) = 1``
    (no noise). The buffers are computed in float64 and stored in the default dtype; they are not part of
    the state dict (the three constructor arguments define them).

    Args:
        num_steps: the number of diffusion steps T.
        beta_start, beta_end: the first and last noise variances, ``0 < beta_start <= beta_end < 1``.

    Attributes:
        betas: ``beta_t``, shape (T,).
        alphas: ``1 - beta_t``, shape (T,).
        alpha_bars: ``prod_{s <= t} alpha_s``, shape (T,).
        config: the constructor arguments as plain data; ``DiffusionSchedule(**config)`` rebuilds it.
    """

    betas: Tensor
    alphas: Tensor
    alpha_bars: Tensor
    log_alpha_bars: Tensor

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        super().__init__()
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"Expected `num_steps` to be a positive int, got {num_steps!r}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"Expected 0 < `beta_start` <= `beta_end` < 1, got {beta_start} and {beta_end}")
        self.num_steps = num_steps
        self.config: dict[str, Any] = {"num_steps": num_steps, "beta_start": beta_start, "beta_end": beta_end}
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)  # cpu: buffers' source
        alpha_bars = torch.cumprod(1.0 - betas, dim=0)
        dtype = torch.get_default_dtype()
        self.register_buffer("betas", betas.to(dtype), persistent=False)
        self.register_buffer("alphas", (1.0 - betas).to(dtype), persistent=False)
        self.register_buffer("alpha_bars", alpha_bars.to(dtype), persistent=False)
        # log alpha_bar at t = 0, 1, ..., T: the table the interpolation reads
        log_table = torch.cat([torch.zeros(1, dtype=torch.float64), alpha_bars.log()])  # cpu: a buffer's source
        self.register_buffer("log_alpha_bars", log_table.to(dtype), persistent=False)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """``alpha_bar`` at integer or real timesteps in [0, T] (clamped to it: no gradient at ``t = 0`` or ``T``).

        Real ``t`` interpolates ``log alpha_bar`` linearly between the neighbouring integer steps, so the
        result is continuous, exact at integers, and differentiable in ``t``.

        Args:
            t: timesteps of any shape, integer or floating point.

        Returns:
            ``alpha_bar(t)``, the shape of ``t``, in ``t``'s dtype when it is floating point (else the buffers').
        """
        dtype = t.dtype if t.is_floating_point() else self.log_alpha_bars.dtype
        t = t.to(dtype).clamp(0.0, float(self.num_steps))
        lower = t.detach().floor().long().clamp(max=self.num_steps - 1)
        table = self.log_alpha_bars.to(dtype)
        left, right = table[lower], table[lower + 1]
        return torch.exp(left + (t - lower.to(dtype)) * (right - left))

    def sigma(self, t: Tensor) -> Tensor:
        """``sqrt(1 - alpha_bar(t))``, the noise level of ``x_t``, floored at 1e-6.

        The floor only acts at ``t < 1e-8`` (``1 - alpha_bar_1 = beta_1``), where it keeps the gradient of the
        square root finite: an exact zero there would turn a zero gradient into NaN (``inf * 0``).
        """
        return (1.0 - self.alpha_bar(t)).clamp_min(_MIN_VARIANCE).sqrt()

    def diffuse(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise``: the forward process in one jump.

        Args:
            x0: clean images in model space ([-1, 1]), shape (B, ...).
            t: per-sample timesteps, shape (B,), integer or real.
            noise: standard Gaussian noise, the shape of ``x0``.
        """
        if t.shape != (x0.shape[0],):
            raise ValueError(f"Expected per-sample timesteps of shape ({x0.shape[0]},), got {tuple(t.shape)}")
        ab = per_sample(self.alpha_bar(t).to(x0.dtype), x0)
        return ab.sqrt() * x0 + per_sample(self.sigma(t).to(x0.dtype), x0) * noise
