"""torchvision's ImageNet ResNet-50 as an :class:`ImageClassifier` (DAD's ImageNet classifier and ``phi``)."""

import os
from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models import ResNet
from torchvision.models import resnet50 as tv_resnet50

from dad.models.base import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier
from dad.models.registry import register_model
from dad.models.weights import load_classifier_weights


class TorchvisionResNet(ImageClassifier):
    """A torchvision ResNet split into body (up to global pooling) and head (its ``fc``).

    The body keeps torchvision's layer names (``body.conv1``, ``body.layer1``, ...).

    Args:
        net: a torchvision ResNet, weights already loaded; its ``fc`` becomes :attr:`head`.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
    """

    def __init__(
        self, net: ResNet, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        fc = net.fc
        super().__init__(
            num_classes=fc.out_features,
            num_features=fc.in_features,
            in_channels=net.conv1.in_channels,
            mean=mean,
            std=std,
        )
        self.body = nn.Sequential(OrderedDict((name, child) for name, child in net.named_children() if name != "fc"))
        self.head = fc

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map torchvision's own key layout (``conv1.*``, ..., ``fc.*``) onto ``body.*`` / ``head.*``."""
        if "fc.weight" not in state_dict:
            return state_dict
        return {(f"head.{k[3:]}" if k.startswith("fc.") else f"body.{k}"): v for k, v in state_dict.items()}

    def _features(self, x: Tensor) -> Tensor:
        return self.body(x).flatten(1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)


@register_model
def resnet50(
    num_classes: int = 1000,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    weights_path: str | None = None,
    in_channels: int = 3,
) -> TorchvisionResNet:
    """torchvision ResNet-50 (2048-d features), optionally with local torchvision weights.

    Args:
        num_classes: number of classes (1000 to use ImageNet weights).
        mean: per-channel normalisation mean (ImageNet by default).
        std: per-channel normalisation standard deviation (ImageNet by default).
        weights_path: a local file holding torchvision's ResNet-50 state dict (e.g. the
            IMAGENET1K_V2 file ``resnet50-11ad3fa6.pth``); ``None`` keeps random weights.
            Nothing is ever downloaded.
        in_channels: must be 3 (accepted so that configs can pass the data's channel count).
    """
    if in_channels != 3:
        raise ValueError(f"resnet50 takes 3-channel images, got in_channels={in_channels}")
    net = tv_resnet50(weights=None, num_classes=num_classes)
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"ResNet-50 weights not found at {weights_path}; pass `weights_path` = a local copy of torchvision's "
                "resnet50 state dict (e.g. resnet50-11ad3fa6.pth for IMAGENET1K_V2), or None for random weights"
            )
        load_classifier_weights(net, weights_path)
    return TorchvisionResNet(net, mean=mean, std=std)
