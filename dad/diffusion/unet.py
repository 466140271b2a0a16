"""A small epsilon-prediction U-Net for DDPM (Ho et al. 2020), sized for 8x8 digits and 32x32 CIFAR images.

No pretrained diffusion weights are reachable from the machines this project runs on, so the score
network is trained here (:mod:`lightning_modules.score`) and kept small. It follows the DDPM design
without attention: a sinusoidal timestep embedding, passed through an MLP, shifts the channels of every
GroupNorm + SiLU residual block. The timestep is real-valued: SSNI's per-sample timesteps ``t(x)`` are
continuous, and the embedding accepts them between the integer steps the network was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ScoreUNet", "timestep_embedding"]

_MAX_GROUPS = 8


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of real-valued timesteps (the Transformer's position encoding, as in DDPM).

    Args:
        t: timesteps, shape (B,), floating point.
        dim: embedding size (an odd size gets a zero last column).
        max_period: the longest wavelength.

    Returns:
        Tensor of shape (B, dim), ``[sin(t f_i), cos(t f_i)]`` with ``f_i = max_period^(-i / (dim // 2))``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None, :]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=1), (0, dim - 2 * half))


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (the largest count that divides ``channels``)."""
    return nn.GroupNorm(math.gcd(_MAX_GROUPS, channels), channels)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep shift added in between, plus a (1x1 when resized) skip."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        resized = in_channels != out_channels
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if resized else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class ScoreUNet(nn.Module):
    """U-Net predicting the noise ``eps_theta(x_t, t)`` of a diffused image ``x_t`` (model space, [-1, 1]).

    The encoder has one level per entry of ``widths``: ``blocks_per_level`` residual blocks, the first
    level at full resolution, each later one after a stride-2 convolution (rounding up, so odd sizes and
    8x8 inputs work). Two residual blocks form the middle. The decoder visits the levels deepest first:
    nearest-neighbour upsampling to the skip's exact size, concatenation, ``blocks_per_level`` residual
    blocks. The output convolution starts at zero, so the untrained network predicts no noise.

    Args:
        in_channels: image channels (input and output).
        widths: channels per level, shallowest first, e.g. ``(32, 64)`` for 8x8 digits,
            ``(64, 128, 128)`` for 32x32 images.
        blocks_per_level: residual blocks per level in the encoder and in the decoder.
        time_dim: width of the timestep MLP; None: ``4 * widths[0]`` (DDPM's choice).
        dropout: dropout inside the residual blocks (DDPM uses 0.1 on CIFAR-10).

    Attributes:
        config: the constructor arguments as plain data; ``ScoreUNet(**config)`` rebuilds the architecture.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 128),
        blocks_per_level: int = 2,
        time_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = list(widths)
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"Expected `in_channels` to be a positive int, got {in_channels!r}")
        if not widths or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"Expected `widths` to be a non-empty sequence of positive ints, got {widths}")
        if not isinstance(blocks_per_level, int) or blocks_per_level < 1:
            raise ValueError(f"Expected `blocks_per_level` to be a positive int, got {blocks_per_level!r}")
        time_dim = 4 * widths[0] if time_dim is None else time_dim
        if not isinstance(time_dim, int) or time_dim < 1:
            raise ValueError(f"Expected `time_dim` to be a positive int, got {time_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected `dropout` in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.config: dict[str, Any] = {"in_channels": in_channels, "widths": widths,
                                       "blocks_per_level": blocks_per_level, "time_dim": time_dim,
                                       "dropout": dropout}
        self.embed_dim = widths[0]
        self.time_mlp = nn.Sequential(nn.Linear(widths[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.input = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)

        def blocks(channels: int, width: int) -> nn.ModuleList:
            return nn.ModuleList(_ResBlock(channels if i == 0 else width, width, time_dim, dropout)
                                 for i in range(blocks_per_level))

        channels = widths[0]
        self.downsample = nn.ModuleList()
        self.encoder = nn.ModuleList()
        for level, width in enumerate(widths):
            if level > 0:
                self.downsample.append(nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1))
            self.encoder.append(blocks(channels, width))
            channels = width
        self.middle = nn.ModuleList(_ResBlock(channels, channels, time_dim, dropout) for _ in range(2))
        self.decoder = nn.ModuleList()
        for width in reversed(widths):
            self.decoder.append(blocks(channels + width, width))
            channels = width
        self.output = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, in_channels, 3, padding=1))
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The predicted noise, the shape of ``x``.

        Args:
            x: diffused images in model space, shape (B, in_channels, H, W).
            t: per-sample timesteps, shape (B,), integer or real (cast to ``x``'s dtype).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"Expected per-sample timesteps of shape ({x.shape[0]},), got {tuple(t.shape)}")
        temb = F.silu(self.time_mlp(timestep_embedding(t.to(x.dtype), self.embed_dim)))
        h = self.input(x)
        skips = []
        for level, level_blocks in enumerate(self.encoder):
            if level > 0:
                h = self.downsample[level - 1](h)
            for block in level_blocks:
                h = block(h, temb)
            skips.append(h)
        for block in self.middle:
            h = block(h, temb)
        for level_blocks, skip in zip(self.decoder, reversed(skips)):
            h = torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], dim=1)
            for block in level_blocks:
                h = block(h, temb)
        return self.output(h)
