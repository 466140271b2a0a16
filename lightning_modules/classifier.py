"""Stage 0: standard training of the classifier ``h`` (any model of the factory)."""

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
        lr, weight_decay, momentum: optimiser settings.
        scheduler: ``cosine`` (over the epochs) or ``none``.
    """

    model: str = "small_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    epochs: int = 15
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Literal["cosine", "none"] = "cosine"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"Expected `classifier.epochs` >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"Expected `classifier.lr` > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"Expected `classifier.weight_decay` >= 0, got {self.weight_decay}")


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
        self.model = model
        self.train_acc = MulticlassAccuracy(model.num_classes)
        self.val_acc = MulticlassAccuracy(model.num_classes)
        self.test_acc = MulticlassAccuracy(model.num_classes)

    def network_specs(self) -> dict[str, Any]:
        return network_specs(self.model)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: tuple[Tensor, Tensor], metric: MulticlassAccuracy, prefix: str) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
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
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
