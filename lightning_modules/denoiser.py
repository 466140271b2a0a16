"""Stage 2: train the denoiser so that denoised AEs are distributed like clean images.

``loss = MMD^2(clean, g(noisy adv)) + alpha * CE(h(g(noisy adv)), y)`` with the classifier ``h`` and
the trained MMD-OPT kernel frozen. The MMD term uses the biased estimator by default, as the
published code does, and is computed over the global batch under DDP.
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from dad.defense import purify
from dad.denoisers import UNetDenoiser
from dad.kernels import ESTIMATORS, Estimator
from dad.models import freeze
from dad.noise import NoiseMode, add_noise
from lightning_modules.checkpoints import STAGE_KEY, build_classifier, build_kernel
from lightning_modules.distributed import gather_global

__all__ = ["DenoiserModule"]


class DenoiserModule(pl.LightningModule):
    """Trains ``g`` with MMD-OPT + alpha x CE; classifier and kernel stay frozen throughout.

    Args:
        classifier_ckpt: the classifier stage's checkpoint.
        kernel_ckpt: the kernel stage's checkpoint.
        denoiser: the :class:`~dad.denoisers.UNetDenoiser` options (widths, depths).
        alpha: weight of the cross-entropy term (paper: 0.01).
        lr: Adam learning rate (paper: 1e-3).
        milestones: epochs at which the learning rate is multiplied by ``gamma`` (paper: [45], 0.1).
        gamma: the decay factor.
        noise_std: standard deviation of the noise added before denoising (paper: 0.25).
        noise: ``one_sided`` (published code) or ``symmetric``.
        estimator: MMD estimator of the loss (``biased`` as published, or ``unbiased``).
    """

    stage = "denoiser"

    def __init__(
        self,
        classifier_ckpt: str,
        kernel_ckpt: str,
        denoiser: dict[str, Any] | None = None,
        alpha: float = 0.01,
        lr: float = 1e-3,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        noise_std: float = 0.25,
        noise: NoiseMode = "one_sided",
        estimator: Estimator = "biased",
    ) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"Expected `alpha` >= 0, got {alpha}")
        if noise_std < 0:
            raise ValueError(f"Expected `noise_std` >= 0, got {noise_std}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"Unknown estimator {estimator!r}; expected one of {sorted(ESTIMATORS)}")
        self.save_hyperparameters()
        self.classifier, _ = build_classifier(classifier_ckpt, hint="train.py classifier")
        self.kernel, _ = build_kernel(kernel_ckpt, self.classifier, hint="train.py kernel")
        freeze(self.classifier)
        freeze(self.kernel)
        self.denoiser = UNetDenoiser(**{"in_channels": self.classifier.in_channels, **(denoiser or {})})
        num_classes = self.classifier.num_classes
        self.train_robust = MulticlassAccuracy(num_classes, average="micro")
        self.val_robust = MulticlassAccuracy(num_classes, average="micro")
        self.val_clean_denoised = MulticlassAccuracy(num_classes, average="micro")
        self.val_mmd = MeanMetric()

    def train(self, mode: bool = True) -> "DenoiserModule":
        """Only the denoiser ever trains: the classifier and kernel stay in eval mode."""
        super().train(mode)
        self.classifier.eval()
        self.kernel.eval()
        return self

    def _classify(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of ``h`` and the kernel features of ``x`` (one pass when ``phi`` is ``h``)."""
        if self.kernel.phi is self.classifier:
            return self.classifier.forward_with_features(x)
        return self.classifier(x), self.kernel.features(x)

    def purify(self, x: Tensor) -> Tensor:
        """Noise, denoise and clamp: the path of a batch judged adversarial at inference."""
        return purify(self.denoiser, x, self.hparams.noise_std, self.hparams.noise)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        clean, adv, y = batch
        # no clamp here: a hard clamp on the training path zeroes gradients of saturated pixels
        denoised = self.denoiser(add_noise(adv, self.hparams.noise_std, self.hparams.noise))
        logits, f_den = self._classify(denoised)
        with torch.no_grad():
            f_clean = self.kernel.features(clean)
        grams = self.kernel.gram_from_features(
            gather_global(self, f_clean), gather_global(self, f_den), gather_global(self, clean),
            gather_global(self, denoised),
        )
        mmd = ESTIMATORS[self.hparams.estimator](*grams)
        ce = F.cross_entropy(logits, y)
        loss = mmd + self.hparams.alpha * ce
        self.train_robust(logits, y)
        self.log_dict({"train/mmd": mmd, "train/ce": ce, "train/loss": loss})
        self.log("train/robust_acc", self.train_robust, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        clean, adv, y = batch
        den_adv = self.purify(adv)
        self.val_robust(self.classifier(den_adv), y)
        self.val_clean_denoised(self.classifier(self.purify(clean)), y)
        if clean.shape[0] >= 2:
            self.val_mmd(self.kernel.mmd2(clean, den_adv, "biased"))
        self.log("val/robust_acc", self.val_robust, prog_bar=True)
        self.log("val/clean_denoised_acc", self.val_clean_denoised)
        self.log("val/mmd", self.val_mmd)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.denoiser.parameters(), lr=self.hparams.lr)
        if not self.hparams.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.hparams.milestones),
                                                     gamma=self.hparams.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STAGE_KEY] = self.stage
