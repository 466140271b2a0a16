"""Stage 0: standard training of the classifier ``h`` (any model of the factory)."""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from dad.models import create_model
from lightning_modules.checkpoints import STAGE_KEY

__all__ = ["ClassifierModule"]


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of a factory classifier; logs ``train/*`` and ``val/acc``.

    Args:
        model: a name from :func:`dad.models.list_models`.
        num_classes: number of classes.
        model_kwargs: extra options of the model builder (e.g. ``in_channels``).
        optimizer: ``adam`` or ``sgd`` (with Nesterov momentum).
        lr, weight_decay, momentum: optimiser settings.
        scheduler: ``cosine`` (over ``trainer.max_epochs``) or ``none``.
    """

    stage = "classifier"

    def __init__(
        self,
        model: str = "small_cnn",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: Literal["cosine", "none"] = "cosine",
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"Expected `lr` > 0, got {lr}")
        self.save_hyperparameters()
        self.model = create_model(model, num_classes=num_classes, **(model_kwargs or {}))
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)
        self.test_acc = MulticlassAccuracy(num_classes)

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
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=True,
                                  weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STAGE_KEY] = self.stage
