"""Pre-activation WideResNets (Zagoruyko & Komodakis 2016), the CIFAR-10 classifiers of DAD.

Parameter names follow the widely used WRN layout (``conv1``, ``block{1,2,3}.layer.{i}`` with
``bn1/conv1/bn2/conv2/convShortcut``, final ``bn1``, head ``fc``), as in RobustBench's standard
WRN-28-10, so checkpoints of that layout load unchanged.
"""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dad.models.base import CIFAR10_MEAN, CIFAR10_STD, ImageClassifier
from dad.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice, with a residual connection.

    When the shape changes, the shortcut is a 1x1 convolution of the *activated* input (the
    standard WRN choice); otherwise it is the identity on the raw input.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution.
        dropout: dropout probability between the two convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.dropout = dropout
        self.convShortcut: nn.Conv2d | None = None  # noqa: N815  (name kept for checkpoint compatibility)
        if stride != 1 or in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output (no activation after the sum: the next block starts with BN-ReLU)."""
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return out + shortcut


class _Stage(nn.Module):
    """A stack of pre-activation blocks held as ``layer`` (the checkpoint layout)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                PreActBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, dropout)
                for i in range(num_blocks)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the blocks in order."""
        return self.layer(x)


class WideResNet(ImageClassifier):
    """WRN-depth-k: a 16-channel stem and three stages of width 16k, 32k, 64k.

    ``depth = 6 n + 4`` with ``n`` blocks per stage; features are the ``64 k``-d globally pooled
    output of the final BN-ReLU.

    Args:
        depth: total depth, with ``(depth - 4) % 6 == 0``.
        widen_factor: width multiplier ``k``.
        dropout: dropout probability inside the blocks (0 disables it).
        num_classes: number of classes.
        in_channels: number of input channels.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"Expected `depth` = 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"Expected `widen_factor` >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected `dropout` in [0, 1), got {dropout}")
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        super().__init__(num_classes=num_classes, num_features=widths[-1], in_channels=in_channels, mean=mean, std=std)
        blocks_per_stage = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.block1 = _Stage(widths[0], widths[1], blocks_per_stage, stride=1, dropout=dropout)
        self.block2 = _Stage(widths[1], widths[2], blocks_per_stage, stride=2, dropout=dropout)
        self.block3 = _Stage(widths[2], widths[3], blocks_per_stage, stride=2, dropout=dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def _features(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(features)


@register_model
def wrn28_10(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    dropout: float = 0.0,
) -> WideResNet:
    """WRN-28-10 (36.5M parameters, 640-d features)."""
    return WideResNet(28, 10, dropout=dropout, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)


@register_model
def wrn70_16(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    dropout: float = 0.0,
) -> WideResNet:
    """WRN-70-16 (267M parameters, 1024-d features)."""
    return WideResNet(70, 16, dropout=dropout, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
