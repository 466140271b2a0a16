"""Stage 0: standard training of the classifier ``h`` (any model of the factory).

Besides plain training, the fast-training recipe of the CIFAR literature (Page's DAWNBench ResNet, Keller
Jordan's airbench) is available piece by piece: a one-cycle schedule (torch's ``OneCycleLR``), label
smoothing, flip-and-crop augmentation on uint8 batches (:mod:`datamodules.augment`), an exponential moving
average of the weights from half of the steps on (:class:`callbacks.DelayedEMA`, then a batch-norm statistics
update) and channels-last memory format.

Adversarial training (``training``, a method of :data:`dad.training.TRAINING_METHODS`: PGD-AT, TRADES, FAT,
FAT-TRADES, GAIRAT, GAIR-FAT) replaces the clean batch by the method's adversarial examples and outer loss; the
inner maximisation runs with batch norm in eval mode and input gradients only, the outer loss in training mode.
Validation then also measures PGD-10 robust accuracy on the first validation images, by which the best checkpoint
is chosen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from dad.attacks import pgd
from dad.distributed import rank_and_world
from dad.models import ImageClassifier
from dad.networks import network_specs
from dad.training import TRAINING_METHODS, Training, TrainingAttack, TrainingMethod, build_method
from lightning_modules.stage import StageModule

__all__ = ["ClassifierModule", "ClassifierSettings", "classifier_optimizer"]

ROBUST_VAL_STEPS = 10
"""Steps of the PGD attack behind ``val/robust_acc`` (PGD-10, the literature's model-selection attack)."""


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
        ema_start: the share of the training steps after which the average starts (before: the live weights;
            an average from the first step keeps ``decay ** steps`` of the random initial weights).
        channels_last: train in channels-last memory format (faster convolutions on some CPUs and GPUs).
        training: ``standard`` (cross-entropy on clean images) or an adversarial training method of
            :data:`dad.training.TRAINING_METHODS` (Linf).
        method: the training method's own options (its ``Options`` dataclass): ``beta`` (TRADES, FAT-TRADES: the KL
            weight, 6), ``omega`` (FAT, FAT-TRADES, GAIR-FAT: the Gaussian term of each step, 0.001), ``lam``
            (GAIRAT, GAIR-FAT: lambda of the weights, -1).
        adv_eps: the training attack's Linf radius (8/255: the papers' CIFAR-10 setting).
        adv_step_size: its step size (2/255: Madry et al.'s CIFAR-10 setting; the TRADES, FAT and GAIRAT code
            uses 0.007 with eps 0.031).
        adv_steps: its steps K (10 in all four papers); also GAIRAT's K in the weights.
        robust_val_samples: adversarial training only: ``val/robust_acc`` is PGD-10 (``adv_eps``,
            ``adv_step_size``) accuracy on this many first validation images, the checkpoint's criterion.
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
    ema_start: float = 0.5
    channels_last: bool = False
    training: Training = "standard"
    method: dict[str, Any] = field(default_factory=dict)
    adv_eps: float = 8 / 255
    adv_step_size: float = 2 / 255
    adv_steps: int = 10
    robust_val_samples: int = 500

    @property
    def adversarial(self) -> bool:
        """Whether the classifier is trained on adversarial examples."""
        return TRAINING_METHODS[self.training].adversarial

    def training_method(self) -> TrainingMethod:
        """The configured method with its training attack and options."""
        return build_method(self.training, TrainingAttack(self.adv_eps, self.adv_step_size, self.adv_steps),
                            self.method)

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
        if not 0.0 <= self.ema_start < 1.0:
            raise ValueError(f"Expected `classifier.ema_start` in [0, 1), got {self.ema_start}")
        if self.training not in TRAINING_METHODS:
            raise ValueError(f"Expected `classifier.training` in {tuple(TRAINING_METHODS)}, got {self.training!r}")
        if not self.adv_eps > 0:
            raise ValueError(f"Expected `classifier.adv_eps` > 0, got {self.adv_eps}")
        if not self.adv_step_size > 0:
            raise ValueError(f"Expected `classifier.adv_step_size` > 0, got {self.adv_step_size}")
        if isinstance(self.adv_steps, bool) or not isinstance(self.adv_steps, int) or self.adv_steps < 1:
            raise ValueError(f"Expected `classifier.adv_steps` to be an integer >= 1, got {self.adv_steps!r}")
        if isinstance(self.robust_val_samples, bool) or not isinstance(self.robust_val_samples, int) \
                or self.robust_val_samples < 1:
            raise ValueError(f"Expected `classifier.robust_val_samples` to be an integer >= 1, "
                             f"got {self.robust_val_samples!r}")
        if self.adversarial and self.label_smoothing != 0:
            raise ValueError(f"Expected `classifier.label_smoothing` 0 with adversarial training (it masks gradients), "
                             f"got {self.label_smoothing}")
        self.training_method()  # the method's own options, checked now


class ClassifierModule(StageModule):
    """Cross-entropy training of an injected classifier, standard or adversarial (``settings.training``).

    Logs ``train/*`` and ``val/acc``; adversarial training also logs ``train/backward_passes_per_sample``
    (the inner steps plus the outer backward), the kappa histogram (to TensorBoard; every method but TRADES,
    which has no labels in its inner loop) and ``val/robust_acc``, the checkpoint's criterion (:attr:`monitor`).

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
        self.method = settings.training_method()
        self.train_acc = MulticlassAccuracy(model.num_classes, validate_args=False)  # no host reads per step
        self.val_acc = MulticlassAccuracy(model.num_classes)
        self.test_acc = MulticlassAccuracy(model.num_classes)
        self.val_robust = MulticlassAccuracy(model.num_classes, average="micro")
        self._robust_seen = 0  # validation images of this rank attacked in the current epoch
        # backward passes per training sample over this fit (1 for standard training): FAT's point is spending fewer
        self.backward_passes = MeanMetric(nan_strategy="disable")
        self.backward_passes_per_sample: float | None = None  # its value, read while the Trainer is live

    @property
    def monitor(self) -> str:
        """The metric by which the best checkpoint is kept: robust accuracy for adversarial training."""
        return "val/robust_acc" if self.settings.adversarial else "val/acc"

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
        self.log(f"{prefix}/loss", loss, prog_bar=prefix != "train", sync_dist=prefix != "train")
        self.log(f"{prefix}/acc", metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def epoch_fraction(self) -> float:
        """The share of the training epochs done, which drives FAT's tau and the start of GAIRAT's weights."""
        return self.current_epoch / self.settings.epochs

    def _adversarial_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        step = self.method.step(self.model, x, y, self.epoch_fraction())
        self.train_acc(step.logits, y)
        self.log("train/loss", step.loss)  # not on the progress bar: it would read the loss back at every step
        self.log("train/adv_acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        self.log("train/backward_passes_per_sample", step.steps.float().mean() + 1.0)
        self.backward_passes.update(step.steps.float() + 1.0)
        if step.kappa is not None:
            self._log_kappa(step.kappa)
        return step.loss

    def _log_kappa(self, kappa: Tensor) -> None:
        if isinstance(self.logger, TensorBoardLogger) and self.global_step % self.trainer.log_every_n_steps == 0:
            self.logger.experiment.add_histogram("train/kappa", kappa, global_step=self.global_step)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.settings.adversarial:
            return self._adversarial_step(batch)
        self.backward_passes.update(torch.ones(len(batch[1]), device=self.device))
        return self._step(batch, self.train_acc, "train")

    def on_train_end(self) -> None:
        """Read the fit's backward passes per sample now: the metric syncs across ranks, which must happen on the
        module's device while the process group's Trainer is live (after ``fit`` the module is back on the CPU)."""
        self.backward_passes_per_sample = float(self.backward_passes.compute())

    def on_validation_epoch_start(self) -> None:
        self._robust_seen = 0

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_acc, "val")
        if self.settings.adversarial:
            self._robust_validation(batch, batch_idx)

    def _robust_validation(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """PGD-10 accuracy on the first ``robust_val_samples`` validation images.

        Validation loaders deal samples round-robin to the ranks (unshuffled), so global image ``i`` is local
        image ``i // world`` of rank ``i % world``: each rank attacks its share of the first images.
        """
        x, y = batch
        s = self.settings
        rank, world = rank_and_world()
        take = min(x.shape[0], len(range(rank, s.robust_val_samples, world)) - self._robust_seen)
        if take > 0:
            self._robust_seen += take
            generator = torch.Generator(x.device).manual_seed(batch_idx)  # the same random starts every epoch
            x_adv = pgd(self.model, x[:take], y[:take], s.adv_eps, s.adv_step_size, ROBUST_VAL_STEPS,
                        generator=generator)
            self.val_robust(self.model(x_adv), y[:take])
        # logged on every step and rank, so that the epoch-end synchronisation of the metric is collective
        self.log("val/robust_acc", self.val_robust, prog_bar=True, on_step=False, on_epoch=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, self.test_acc, "test")

    def configure_optimizers(self) -> Any:
        opt, sched, interval = classifier_optimizer(self.settings, self.model.parameters(),
                                                    int(self.trainer.estimated_stepping_batches),
                                                    self.trainer.max_epochs or 1)
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}


def classifier_optimizer(settings: ClassifierSettings, parameters: Iterable[torch.nn.Parameter], steps: int,
                         epochs: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None, str]:
    """The stage's optimiser, its schedule (None: constant) and the schedule's interval (``step`` or ``epoch``),
    for a fit of ``steps`` optimiser steps over ``epochs`` epochs."""
    s = settings
    if s.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(parameters, lr=s.lr, momentum=s.momentum, nesterov=True,
                                                     weight_decay=s.weight_decay)
    else:
        opt = torch.optim.Adam(parameters, lr=s.lr, weight_decay=s.weight_decay)
    if s.scheduler == "none":
        return opt, None, "epoch"
    if s.scheduler == "onecycle":
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=max(1, steps),
                                                        pct_start=s.warmup, div_factor=25.0,
                                                        final_div_factor=400.0), "step"
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs)), "epoch"
