"""CIFAR-style ResNets (He et al. 2016): 3x3 stem, no max pool, basic blocks, global average pool.

Parameter names follow the common CIFAR ResNet layout (``conv1``, ``bn1``, ``layer{i}``, blocks with
``conv1/bn1/conv2/bn2/shortcut``, head ``linear``), so state dicts of that layout load unchanged.
"""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dad.models.base import CIFAR10_MEAN, CIFAR10_STD, ImageClassifier
from dad.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (projected when the shape changes).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (2 halves the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output, ReLU applied after the sum."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(ImageClassifier):
    """A CIFAR ResNet with one stage per width; every stage after the first halves the resolution.

    Depth = 1 (stem) + 2 * sum(num_blocks) (block convolutions) + 1 (head).

    Args:
        widths: channels of each stage; the stem has ``widths[0]`` channels.
        num_blocks: basic blocks per stage (same length as ``widths``).
        num_classes: number of classes.
        in_channels: number of input channels.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
    """

    def __init__(
        self,
        widths: Sequence[int],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        if len(widths) == 0 or len(widths) != len(num_blocks):
            raise ValueError(
                f"Expected `widths` and `num_blocks` of the same non-zero length, "
                f"got {len(widths)} and {len(num_blocks)}"
            )
        if min(num_blocks) < 1 or min(widths) < 1:
            raise ValueError(
                f"Expected positive `widths` and `num_blocks`, got {tuple(widths)} and {tuple(num_blocks)}"
            )
        super().__init__(num_classes=num_classes, num_features=widths[-1], in_channels=in_channels, mean=mean, std=std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels = widths[0]
        for index, (width, blocks) in enumerate(zip(widths, num_blocks)):
            stride = 1 if index == 0 else 2
            layers = [BasicBlock(channels if i == 0 else width, width, stride if i == 0 else 1) for i in range(blocks)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
            channels = width
        self.num_stages = len(widths)
        self.linear = nn.Linear(widths[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            out = getattr(self, f"layer{index + 1}")(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.linear(features)


@register_model
def cifar_resnet18_small(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    num_blocks: Sequence[int] = (3, 3, 2),
) -> CifarResNet:
    """CIFAR ResNet-18 with widths 16/32/64 (64-d features): DAD's feature extractor ``phi``.

    Three stages with (3, 3, 2) basic blocks give depth 1 + 2 * 8 + 1 = 18. The published DAD
    code uses (2, 2, 2) blocks here (14 layers despite its name); pass ``num_blocks=(2, 2, 2)``
    to reproduce that layout.
    """
    return CifarResNet((16, 32, 64), num_blocks, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)


@register_model
def resnet18_cifar(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> CifarResNet:
    """Standard CIFAR ResNet-18: widths 64/128/256/512, (2, 2, 2, 2) blocks, 512-d features."""
    return CifarResNet(
        (64, 128, 256, 512), (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, mean=mean, std=std
    )
