"""Stage 0: standard training of the classifier ``h`` (any model of the factory).

Besides plain training, the fast-training recipe of the CIFAR literature (Page's DAWNBench ResNet, Keller
Jordan's airbench) is available piece by piece: a one-cycle schedule (torch's ``OneCycleLR``), label
smoothing, flip-and-crop augmentation on uint8 batches (:mod:`datamodules.augment`), an exponential moving
average of the weights (Lightning's ``EMAWeightAveraging``, followed by a batch-norm statistics update) and
channels-last memory format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from dad.models import ImageClassifier
from dad.networks import network_specs
from lightning_modules.stage import StageModule

__all__ = ["ClassifierModule", "ClassifierSettings"]


@dataclass(frozen=True)
class ClassifierSettings:
    """The classifier stage. ``weights`` loads a trained classifier from a file instead of training one.

    Attributes:
        model: a name from :func:`dad.models.list_models`.
        model_kwargs: options of the model builder (``in_channels`` and ``num_classes`` come from the data).
        weights: a state dict or checkpoint of a trained ``model``; None: trained here.
        epochs: training epochs.
        optimizer: ``adam`` or ``sgd`` (with Nesterov momentum).
        lr, weight_decay, momentum: optimiser settings; ``lr`` is the peak of the one-cycle schedule.
        scheduler: ``cosine`` (over the epochs, per epoch), ``onecycle`` (per step: a warm-up to ``lr`` over
            ``warmup`` of the steps, then cosine annealing to ``lr / 1e4``) or ``none``.
        warmup: the one-cycle schedule's share of warm-up steps.
        label_smoothing: cross-entropy label smoothing (keep 0 for adversarial training: it masks gradients).
        augment: random crop (``crop_padding`` pixels of zero padding) and horizontal flip of each batch.
        crop_padding: the crop's padding (0: flips only).
        ema_decay: keep an exponential moving average of the weights with this decay (None: off); the average
            is validated and kept, and its batch-norm statistics are recomputed on the training images.
        channels_last: train in channels-last memory format (faster convolutions on some CPUs and GPUs).
    """

    model: str = "small_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    epochs: int = 15
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Literal["cosine", "onecycle", "none"] = "cosine"
    warmup: float = 0.25
    label_smoothing: float = 0.0
    augment: bool = False
    crop_padding: int = 4
    ema_decay: float | None = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"Expected `classifier.epochs` >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"Expected `classifier.lr` > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"Expected `classifier.weight_decay` >= 0, got {self.weight_decay}")
        if not 0.0 < self.warmup < 1.0:
            raise ValueError(f"Expected `classifier.warmup` in (0, 1), got {self.warmup}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"Expected `classifier.label_smoothing` in [0, 1), got {self.label_smoothing}")
        if self.crop_padding < 0:
            raise ValueError(f"Expected `classifier.crop_padding` >= 0, got {self.crop_padding}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"Expected `classifier.ema_decay` in (0, 1), got {self.ema_decay}")


class ClassifierModule(StageModule):
    """Cross-entropy training of an injected classifier; logs ``train/*`` and ``val/acc``.

    Args:
        model: the classifier (built by :func:`dad.models.create_model`).
        settings: the stage's :class:`ClassifierSettings`.
    """

    stage = "classifier"

    def __init__(self, model: ImageClassifier, settings: ClassifierSettings = ClassifierSettings()) -> None:
        super().__init__()
        self.save_hyperparameters({"settings": asdict(settings)})
        self.settings = settings
        self.model = model.to(memory_format=torch.channels_last) if settings.channels_last else model
        self.train_acc = MulticlassAccuracy(model.num_classes)
        self.val_acc = MulticlassAccuracy(model.num_classes)
        self.test_acc = MulticlassAccuracy(model.num_classes)

    def network_specs(self) -> dict[str, Any]:
        return network_specs(self.model)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], metric: MulticlassAccuracy, prefix: str) -> Tensor:
        x, y = batch
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x)
        smoothing = self.settings.label_smoothing if prefix == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        metric(logits, y)
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "train", sync_dist=prefix != "train")
        self.log(f"{prefix}/acc", metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, self.test_acc, "test")

    def configure_optimizers(self) -> Any:
        s = self.settings
        if s.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(self.model.parameters(), lr=s.lr, momentum=s.momentum,
                                                         nesterov=True, weight_decay=s.weight_decay)
        else:
            opt = torch.optim.Adam(self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        if s.scheduler == "none":
            return opt
        if s.scheduler == "onecycle":
            steps = max(1, int(self.trainer.estimated_stepping_batches))
            cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=steps, pct_start=s.warmup,
                                                        div_factor=25.0, final_div_factor=400.0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": cycle, "interval": "step"}}
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
