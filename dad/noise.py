"""The Gaussian noise added before denoising, in training and at inference alike."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["NoiseMode", "add_noise", "NOISE_MODES"]

NoiseMode = Literal["one_sided", "symmetric"]
NOISE_MODES: tuple[str, ...] = ("one_sided", "symmetric")


def add_noise(x: Tensor, std: float, mode: NoiseMode = "one_sided") -> Tensor:
    """Add Gaussian noise of standard deviation ``std`` to ``x``.

    ``one_sided`` reproduces the published code, which clamps the noise sample itself to [0, 1]
    before adding it (so only brightening noise survives, half the samples are zero); ``symmetric``
    adds the plain Gaussian. The sum is not clamped: the denoiser sees the noisy image as is.
    """
    if std < 0:
        raise ValueError(f"Expected noise `std` >= 0, got {std}")
    if mode not in NOISE_MODES:
        raise ValueError(f"Unknown noise mode {mode!r}; expected one of {NOISE_MODES}")
    if std == 0:
        return x
    noise = torch.randn_like(x) * std
    if mode == "one_sided":
        noise = noise.clamp(0.0, 1.0)
    return x + noise
