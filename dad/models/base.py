"""The contract every classifier of the zoo follows, and how frozen networks are held.

Every classifier takes images in [0, 1] and normalises them itself, so attacks, detectors and
denoisers never need to know a model's normalisation. It exposes its penultimate features and its
head separately: the features are the ``phi`` of DAD's semantic MMD kernel, the head gives logits.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

DIGITS_MEAN: tuple[float, ...] = (0.5,)
DIGITS_STD: tuple[float, ...] = (0.5,)
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)


def _channel_stats(name: str, values: Sequence[float], in_channels: int) -> Tensor:
    """Turn per-channel statistics into a (1, C, 1, 1) tensor, broadcasting a single value.

    Args:
        name: argument name, for the error message.
        values: one value per channel, or a single value used for every channel.
        in_channels: number of input channels C.

    Returns:
        A float32 tensor of shape (1, C, 1, 1).
    """
    stats = tuple(float(v) for v in values)
    if len(stats) == 1:
        stats = stats * in_channels
    if len(stats) != in_channels:
        raise ValueError(f"Expected `{name}` with 1 or {in_channels} values, got {len(stats)}")
    return torch.tensor(stats, dtype=torch.float32).view(1, in_channels, 1, 1)  # cpu: registered as a buffer


class ImageClassifier(nn.Module, ABC):
    """An image classifier taking [0, 1] images, normalising inside, with features and head split.

    Subclasses build their layers, implement :meth:`_features` (normalised images to flattened
    penultimate features) and :meth:`forward_head` (features to logits). The normalisation
    constants are non-persistent buffers: they are configuration (constructor arguments), not
    weights, so checkpoints trained elsewhere load unchanged and the buffers follow ``.to()``.

    Args:
        num_classes: number of output logits.
        num_features: size of the penultimate feature vector.
        in_channels: number of input channels.
        mean: per-channel mean subtracted from the [0, 1] input (one value broadcasts).
        std: per-channel standard deviation dividing the centred input (one value broadcasts).
    """

    mean: Tensor
    std: Tensor
    spec: dict | None = None  # {"name", "kwargs"}, set by :func:`dad.models.create_model`

    def __init__(
        self,
        num_classes: int,
        num_features: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_features", num_features), ("in_channels", in_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}")
        std_t = _channel_stats("std", std, in_channels)
        if not bool((std_t > 0).all()):
            raise ValueError(f"Expected every `std` value > 0, got {tuple(std)}")
        self.num_classes = num_classes
        self.num_features = num_features
        self.in_channels = in_channels
        self.register_buffer("mean", _channel_stats("mean", mean, in_channels), persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        """Map [0, 1] images to the network's normalised input space."""
        return (x - self.mean) / self.std

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` is a (B, in_channels, H, W) tensor."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Expected input of shape (B, {self.in_channels}, H, W) for {type(self).__name__}, "
                f"got {tuple(x.shape)}"
            )

    @abstractmethod
    def _features(self, x: Tensor) -> Tensor:
        """Compute penultimate features (B, num_features) from already normalised images."""

    @abstractmethod
    def forward_head(self, features: Tensor) -> Tensor:
        """Map penultimate features (B, num_features) to logits (B, num_classes)."""

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate features of [0, 1] images: normalised, through the body, pooled, flattened.

        Args:
            x: images in [0, 1], shape (B, in_channels, H, W).

        Returns:
            Features of shape (B, num_features).
        """
        self.check_input(x)
        return self._features(self.normalize(x))

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and penultimate features from one forward pass.

        Args:
            x: images in [0, 1], shape (B, in_channels, H, W).

        Returns:
            ``(logits, features)`` of shapes (B, num_classes) and (B, num_features).
        """
        features = self.forward_features(x)
        return self.forward_head(features), features

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images in [0, 1] of shape (B, in_channels, H, W)."""
        return self.forward_head(self.forward_features(x))


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a network in place: no parameter gradients, evaluation mode.

    This is how the project holds frozen networks (the classifier ``h``, the feature extractor
    ``phi``, a trained kernel): gradients still flow *through* the module to its input, which
    attacks and the denoiser loss need, but its parameters are never updated and its batch-norm
    statistics are never refreshed. A parent's ``.train()`` call switches the module back to
    training mode, so owners call :func:`freeze` again after such calls (Lightning >= 2.2 leaves
    modes alone in ``fit``).

    Args:
        module: the network to freeze.

    Returns:
        The same module, frozen.
    """
    module.requires_grad_(False)
    return module.eval()
