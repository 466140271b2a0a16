"""A small CNN for the embedded default dataset (scikit-learn's 8x8 one-channel digits)."""

from collections.abc import Sequence

from torch import Tensor, nn

from dad.models.base import DIGITS_MEAN, DIGITS_STD, ImageClassifier
from dad.models.registry import register_model


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (same padding), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(ImageClassifier):
    """Three conv-BN-ReLU layers (32, 64, 64 channels), a 2x2 max pool, global average pooling,
    a 128-d ReLU layer (the penultimate features) and a linear head.

    Fast enough to train on CPU in seconds; works on any input of at least 2x2 pixels.

    Args:
        num_classes: number of classes.
        in_channels: number of input channels.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        mean: Sequence[float] = DIGITS_MEAN,
        std: Sequence[float] = DIGITS_STD,
    ) -> None:
        super().__init__(num_classes=num_classes, num_features=128, in_channels=in_channels, mean=mean, std=std)
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, 32),
            _conv_bn_relu(32, 64),
            nn.MaxPool2d(kernel_size=2, ceil_mode=True),
            _conv_bn_relu(64, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.penultimate = nn.Sequential(nn.Linear(64, self.num_features), nn.ReLU(inplace=True))
        self.head = nn.Linear(self.num_features, num_classes)

    def _features(self, x: Tensor) -> Tensor:
        return self.penultimate(self.body(x))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)


@register_model
def small_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    mean: Sequence[float] = DIGITS_MEAN,
    std: Sequence[float] = DIGITS_STD,
) -> SmallCNN:
    """Small CNN for 8x8 digits (one channel, 10 classes, 128-d features)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
