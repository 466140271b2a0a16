"""Stage 1: train the MMD-OPT kernel by maximising the test power J on (clean, adversarial) pairs."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from dad.kernels import SemanticKernel
from dad.mmd import j_statistic, mmd2_unbiased, mmd2_variance
from dad.models import create_model, freeze
from lightning_modules.checkpoints import STAGE_KEY, build_classifier
from lightning_modules.distributed import gather_global

__all__ = ["KernelModule"]


class KernelModule(pl.LightningModule):
    """Maximises ``J = MMD^2_u / sqrt(var + reg)`` of the semantic kernel over the global batch.

    The bandwidths are initialised as in the paper on the first (global) batch; ``J`` at the first and
    at the last step are logged (``kernel/j_start``, ``kernel/j_end``) so a run that did not raise the
    test power is visible at once.

    Args:
        classifier_ckpt: the classifier stage's checkpoint; its penultimate layer is ``phi`` unless
            ``feature_extractor`` names another model.
        feature_extractor: optional factory name of a separate ``phi`` (e.g. ``cifar_resnet18_small``).
        feature_extractor_kwargs: its builder options.
        feature_extractor_ckpt: its weights (a state dict or checkpoint file).
        train_features: also train ``phi``.
        lr: Adam learning rate (the paper: 2e-4 with 200 full-batch steps; small data needs more).
        reg: the variance regulariser of J.
        init_eps: initial ``eps`` of the kernel.
    """

    stage = "kernel"

    def __init__(
        self,
        classifier_ckpt: str,
        feature_extractor: str | None = None,
        feature_extractor_kwargs: dict[str, Any] | None = None,
        feature_extractor_ckpt: str | None = None,
        train_features: bool = False,
        lr: float = 1e-2,
        reg: float = 1e-8,
        init_eps: float = 1e-10,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"Expected `lr` > 0, got {lr}")
        self.save_hyperparameters()
        if feature_extractor:
            phi: nn.Module = create_model(
                feature_extractor, checkpoint_path=feature_extractor_ckpt, **(feature_extractor_kwargs or {})
            )
        else:
            phi, _ = build_classifier(classifier_ckpt, hint="train.py classifier")
        if not train_features:
            freeze(phi)
        self.kernel = SemanticKernel(phi, train_features=train_features, eps=init_eps)
        self.register_buffer("j_start", torch.tensor(math.nan))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        clean, adv, _ = batch
        fx = gather_global(self, self.kernel.features(clean))
        fy = gather_global(self, self.kernel.features(adv))
        x, y = gather_global(self, clean), gather_global(self, adv)
        if not bool(self.kernel.initialized):
            # the paper's initialisation, on the global batch so that every rank starts identically
            self.kernel.init_bandwidths(x, y, eps=self.hparams.init_eps)
        grams = self.kernel.gram_from_features(fx, fy, x, y)
        j = j_statistic(*grams, reg=self.hparams.reg)
        if torch.isnan(self.j_start):
            self.j_start.fill_(j.detach())
        self.log_dict(
            {
                "kernel/j": j,
                "kernel/mmd2": mmd2_unbiased(*grams),
                "kernel/variance": mmd2_variance(*grams),
                "kernel/eps": self.kernel.eps,
                "kernel/sigma_phi": self.kernel.sigma_phi,
                "kernel/sigma_q": self.kernel.sigma_q,
                "kernel/j_start": self.j_start,
            },
            prog_bar=False,
        )
        self.log("j", j, prog_bar=True, logger=False)
        return -j

    @torch.no_grad()
    def j_on(self, clean: Tensor, adv: Tensor) -> float:
        """J of the current kernel on a (clean, adversarial) batch, for reports."""
        return j_statistic(*self.kernel.gram(clean, adv), reg=self.hparams.reg).item()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.kernel.parameters(), lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STAGE_KEY] = self.stage
