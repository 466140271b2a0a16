"""Data augmentation on uint8 image batches already in memory: random crop (zero padding) and horizontal flip.

The standard CIFAR augmentation (pad 4, random 32x32 crop, flip with probability 1/2) done for a whole
batch with one gather, on the uint8 tensors the data modules hold: no per-image PIL work, no float copy
of the padded batch, and on the device that holds the batch (its offsets and flips drawn there). A
:class:`FlipCrop` holds the settings; it is also a ``collate_fn`` of ``(image, label)`` samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["flip_crop", "FlipCrop", "to_float"]


def to_float(images: Tensor) -> Tensor:
    """Images as float32 in [0, 1] (uint8 is divided by 255, floats are passed through)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def flip_crop(images: Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Randomly crop each image from its zero-padded copy and flip it horizontally with probability 1/2.

    Args:
        images: a batch ``(B, C, H, W)`` of any dtype (uint8 in the training loader).
        padding: pixels of zeros added on every side before cropping back to ``H x W`` (0: no crop).
        flip: flip half of the images (chosen at random) left to right.
        generator: random generator of the offsets and flips, on the images' device (None: that device's default).

    Returns:
        A batch of the shape and dtype of ``images``: ``out[i] = flip_i(padded[i, :, dy_i:dy_i+H, dx_i:dx_i+W])``
        with ``dy_i, dx_i`` uniform in ``[0, 2 padding]``.
    """
    if images.dim() != 4:
        raise ValueError(f"Expected a batch of images (B, C, H, W), got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"Expected `padding` >= 0, got {padding}")
    b, c, h, w = images.shape
    device = images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=device)
    flips = (torch.rand(b, generator=generator, device=device) < 0.5 if flip
             else torch.zeros(b, dtype=torch.bool, device=device))
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = offsets[0, :, None] + torch.arange(h, device=device)
    columns = torch.where(flips[:, None], torch.arange(w - 1, -1, -1, device=device),
                          torch.arange(w, device=device)) + offsets[1, :, None]
    images_index = torch.arange(b, device=device)[:, None, None, None]
    channels = torch.arange(c, device=device)[None, :, None, None]
    return padded[images_index, channels, rows[:, None, :, None], columns[:, None, None, :]]


class FlipCrop:
    """``collate_fn`` that stacks ``(uint8 image, label)`` samples, augments the batch and scales it to [0, 1].

    Args:
        padding: crop padding (0: no crop).
        flip: random horizontal flips.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        self.padding = padding
        self.flip = flip

    def batch(self, images: Tensor) -> Tensor:
        """A batch augmented and scaled to float32 in [0, 1] (uint8 is divided by 255), on its own device."""
        return to_float(flip_crop(images, self.padding, self.flip))

    def __call__(self, samples: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        images = torch.stack([image for image, _ in samples])
        labels = torch.stack([torch.as_tensor(label) for _, label in samples])
        return self.batch(images), labels
