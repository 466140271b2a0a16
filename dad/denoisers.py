"""The DAD denoiser: an HGD-style U-Net that predicts a residual added to its input.

Liao et al. 2018 ("Defense against Adversarial Attacks Using High-Level Representation Guided
Denoiser") denoise with a U-Net whose output is ``x + residual``; DAD trains the same shape of
network with an MMD-OPT loss. The encoder keeps every stage's output as a skip connection; the
decoder upsamples to each skip's exact size, so any input size works (odd sizes, and 8x8 images
whose deepest stages are 1x1).
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_OUTPUT_INIT_STD = 1e-4


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, batch_norm: bool = True) -> nn.Sequential:
    """3x3 convolution (padding 1, so stride 2 gives ceil(H / 2)), batch norm (optional), ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=not batch_norm),
        nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity(),
        nn.ReLU(inplace=True),
    )


def _stage(in_channels: int, width: int, depth: int, stride: int, batch_norm: bool) -> nn.Sequential:
    """``depth`` conv-BN-ReLU blocks of ``width`` channels; the first one carries the stride."""
    return nn.Sequential(
        *(
            _conv_bn_relu(in_channels if i == 0 else width, width, stride if i == 0 else 1, batch_norm)
            for i in range(depth)
        )
    )


def _check_positive_ints(name: str, values: Sequence[int]) -> list[int]:
    """Return ``values`` as a list, or raise ValueError unless it is a non-empty list of positive ints."""
    values = list(values)
    if not values or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"Expected `{name}` to be a non-empty sequence of positive ints, got {values}")
    return values


class UNetDenoiser(nn.Module):
    """U-Net denoiser ``g(x) = x + residual(x)`` (no clamping: callers decide, a clamp kills gradients).

    The encoder has one stage per entry of ``enc_widths``: the first at full resolution, each later
    one halving the resolution (rounding up) with a stride-2 first convolution. The decoder has
    one stage per skip connection, deepest first: upsample (bilinear) to the skip's size,
    concatenate, conv blocks. A 1x1 convolution maps the last decoder stage to the residual; it is
    initialised near zero so the untrained denoiser is close to the identity.

    The defaults are the HGD configuration used by DAD: encoder widths (64, 128, 256, 256, 256) with
    (2, 3, 3, 3, 3) blocks, decoder widths (256, 256, 128, 64) with (3, 3, 3, 2) blocks.

    Args:
        in_channels: image channels (input and output).
        enc_widths: encoder stage widths, shallowest first (at least 2 stages).
        enc_depths: conv-BN-ReLU blocks per encoder stage.
        dec_widths: decoder stage widths, deepest first; ``len(enc_widths) - 1`` entries.
        dec_depths: conv-BN-ReLU blocks per decoder stage.
        batch_norm: use batch norm (the HGD design); without it the convolutions get biases. Under DDP
            batch norm uses each rank's own batch statistics (``SyncBatchNorm`` needs GPUs).

    Attributes:
        config: the constructor arguments as plain data; ``UNetDenoiser(**config)`` rebuilds the
            architecture.
    """

    def __init__(
        self,
        in_channels: int = 3,
        enc_widths: Sequence[int] = (64, 128, 256, 256, 256),
        enc_depths: Sequence[int] = (2, 3, 3, 3, 3),
        dec_widths: Sequence[int] = (256, 256, 128, 64),
        dec_depths: Sequence[int] = (3, 3, 3, 2),
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"Expected `in_channels` to be a positive int, got {in_channels!r}")
        enc_widths = _check_positive_ints("enc_widths", enc_widths)
        enc_depths = _check_positive_ints("enc_depths", enc_depths)
        dec_widths = _check_positive_ints("dec_widths", dec_widths)
        dec_depths = _check_positive_ints("dec_depths", dec_depths)
        if len(enc_widths) < 2 or len(enc_depths) != len(enc_widths):
            raise ValueError(
                f"Expected `enc_widths` and `enc_depths` of the same length >= 2, got {enc_widths} and {enc_depths}"
            )
        if len(dec_widths) != len(enc_widths) - 1 or len(dec_depths) != len(dec_widths):
            raise ValueError(
                f"Expected `dec_widths` and `dec_depths` with {len(enc_widths) - 1} entries (one per skip), "
                f"got {dec_widths} and {dec_depths}"
            )
        self.in_channels = in_channels
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "enc_widths": enc_widths,
            "enc_depths": enc_depths,
            "dec_widths": dec_widths,
            "dec_depths": dec_depths,
            "batch_norm": batch_norm,
        }
        channels = in_channels
        encoder = []
        for index, (width, depth) in enumerate(zip(enc_widths, enc_depths)):
            encoder.append(_stage(channels, width, depth, 1 if index == 0 else 2, batch_norm))
            channels = width
        self.encoder = nn.ModuleList(encoder)
        skip_widths = enc_widths[-2::-1]
        decoder = []
        for skip_width, width, depth in zip(skip_widths, dec_widths, dec_depths):
            decoder.append(_stage(channels + skip_width, width, depth, 1, batch_norm))
            channels = width
        self.decoder = nn.ModuleList(decoder)
        self.output = nn.Conv2d(channels, in_channels, kernel_size=1, bias=False)
        nn.init.normal_(self.output.weight, std=_OUTPUT_INIT_STD)

    def residual(self, x: Tensor) -> Tensor:
        """The predicted correction ``g(x) - x``, same shape as ``x``.

        Args:
            x: images, shape (B, in_channels, H, W).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        skips = []
        out = x
        for stage in self.encoder:
            out = stage(out)
            skips.append(out)
        skips.pop()
        for stage, skip in zip(self.decoder, reversed(skips)):
            out = F.interpolate(out, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            out = stage(torch.cat([out, skip], dim=1))
        return self.output(out)

    def forward(self, x: Tensor) -> Tensor:
        """Denoised images ``x + residual(x)``, same shape as ``x`` (not clamped to [0, 1])."""
        return x + self.residual(x)
