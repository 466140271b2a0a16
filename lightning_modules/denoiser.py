"""Stage 2: train the denoiser so that denoised AEs are distributed like clean images.

``loss = MMD^2(clean, g(noisy adv)) + alpha * CE(h(g(noisy adv)), y)`` with the classifier ``h`` and
the trained MMD-OPT kernel frozen. The MMD term uses the biased estimator by default, as the
published code does, and is computed over the global batch under DDP.

With ``adv_steps`` > 0 (not in the paper) the denoiser is also trained adversarially against the route of a
flagged batch: each step crafts PGD-K examples of ``h(clamp(g(noise(x'))))`` around the clean images (the
attack that gets a batch flagged and then fools denoiser + classifier, under which a robust backbone's
purified route was the weak one) and adds ``adv_weight * CE`` on them, the PGD-AT loss of Madry et al. 2018
with only the denoiser trainable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from dad.purification import DenoiserPurifier, PurifiedRoute, purify
from dad.denoisers import UNetDenoiser
from dad.distributed import gather_global
from dad.kernels import ESTIMATORS, SemanticKernel
from dad.models import ImageClassifier, freeze
from dad.networks import logits_and_features, network_specs
from dad.noise import NoiseMode, add_noise
from dad.training.inner import pgd_at_examples
from lightning_modules.stage import StageModule

__all__ = ["DenoiserModule", "DenoiserSettings"]


@dataclass(frozen=True)
class DenoiserSettings:
    """The denoiser stage (the paper: Adam 1e-3, x0.1 at epoch 45, 60 epochs, batch 100, alpha 0.01, noise 0.25).

    Attributes:
        epochs: training epochs.
        batch_size: pairs per step and process (the MMD term is computed on the global batch).
        lr: Adam learning rate.
        milestones: epochs at which the learning rate is multiplied by ``gamma``.
        gamma: the decay factor.
        alpha: weight of the cross-entropy term.
        noise_std: standard deviation of the noise added before denoising.
        noise: ``one_sided`` (the published code clamps the noise sample to [0, 1]) or ``symmetric``.
        estimator: MMD estimator of the loss (``biased`` as published, or ``unbiased``).
        net: the :class:`~dad.denoisers.UNetDenoiser` options (widths, depths, batch norm).
        adv_steps: 0 (the paper): train on the stored AEs of the classifier only; K > 0: also PGD-K examples of
            the purified route (uniform start, input gradients only, networks in eval mode), see the module
            docstring; the checkpoint kept is then the best PGD-K accuracy of that route on the validation pairs.
        adv_eps: their Linf radius (the evaluation's: 8/255 on CIFAR-10, 0.2 on digits).
        adv_step_size: their step size.
        adv_weight: weight of their cross-entropy.
    """

    epochs: int = 60
    batch_size: int = 100
    lr: float = 1e-3
    milestones: list[int] = field(default_factory=lambda: [45])
    gamma: float = 0.1
    alpha: float = 0.01
    noise_std: float = 0.25
    noise: NoiseMode = "one_sided"
    estimator: Literal["biased", "unbiased"] = "biased"
    net: dict[str, Any] = field(default_factory=dict)
    adv_steps: int = 0
    adv_eps: float = 8 / 255
    adv_step_size: float = 2 / 255
    adv_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"Expected `denoiser.epochs` >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"Expected an MMD batch of at least 2 (`denoiser.batch_size`), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"Expected `denoiser.lr` > 0, got {self.lr}")
        if self.alpha < 0:
            raise ValueError(f"Expected `denoiser.alpha` >= 0, got {self.alpha}")
        if self.noise_std < 0:
            raise ValueError(f"Expected `denoiser.noise_std` >= 0, got {self.noise_std}")
        if isinstance(self.adv_steps, bool) or not isinstance(self.adv_steps, int) or self.adv_steps < 0:
            raise ValueError(f"Expected `denoiser.adv_steps` to be an integer >= 0, got {self.adv_steps!r}")
        if self.adv_steps and not (self.adv_eps > 0 and self.adv_step_size > 0 and self.adv_weight >= 0):
            raise ValueError("Expected `denoiser.adv_eps` > 0, `denoiser.adv_step_size` > 0 and "
                             f"`denoiser.adv_weight` >= 0, got {self.adv_eps}, {self.adv_step_size}, "
                             f"{self.adv_weight}")


class DenoiserModule(StageModule):
    """Trains ``g`` with MMD-OPT + alpha x CE; the injected classifier and kernel stay frozen throughout.

    Args:
        classifier: the trained classifier ``h``.
        kernel: the trained MMD-OPT kernel (its ``phi`` may be ``classifier`` itself).
        denoiser: the network to train.
        settings: the stage's :class:`DenoiserSettings`.
    """

    stage = "denoiser"

    def __init__(self, classifier: ImageClassifier, kernel: SemanticKernel, denoiser: UNetDenoiser,
                 settings: DenoiserSettings = DenoiserSettings()) -> None:
        super().__init__()
        self.save_hyperparameters({"settings": asdict(settings)})
        self.settings = settings
        self.classifier = freeze(classifier)
        self.kernel = freeze(kernel)
        self.denoiser = denoiser
        num_classes = classifier.num_classes
        self.train_robust = MulticlassAccuracy(num_classes, average="micro", validate_args=False)  # no host reads
        self.val_robust = MulticlassAccuracy(num_classes, average="micro")
        self.val_clean_denoised = MulticlassAccuracy(num_classes, average="micro")
        self.val_mmd = MeanMetric()
        self.train_route_robust = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_route_robust = MulticlassAccuracy(num_classes, average="micro")

    def network_specs(self) -> dict[str, Any]:
        return network_specs(self.classifier, self.kernel, self.denoiser)

    def train(self, mode: bool = True) -> DenoiserModule:
        """Only the denoiser ever trains: the classifier and kernel stay in eval mode."""
        super().train(mode)
        self.classifier.eval()
        self.kernel.eval()
        return self

    def purify(self, x: Tensor) -> Tensor:
        """Noise, denoise and clamp: the path of a batch judged adversarial at inference."""
        return purify(self.denoiser, x, self.settings.noise_std, self.settings.noise)

    def _denoise_unclamped(self, x: Tensor) -> Tensor:
        """Noise and denoise without the clamp: the training path (a hard clamp zeroes saturated pixels' gradients)."""
        return self.denoiser(add_noise(x, self.settings.noise_std, self.settings.noise))

    def route_examples(self, clean: Tensor, y: Tensor) -> Tensor:
        """PGD-K examples (``adv_*`` settings) of the purified route around ``clean``; inputs' gradients only."""
        s = self.settings
        route = PurifiedRoute(DenoiserPurifier(self.denoiser, s.noise_std, s.noise), self.classifier)
        return pgd_at_examples(route, clean, y, s.adv_eps, s.adv_step_size, s.adv_steps).examples

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        clean, adv, y = batch
        denoised = self._denoise_unclamped(adv)
        logits, f_den = logits_and_features(self.classifier, self.kernel, denoised)
        with torch.no_grad():
            f_clean = self.kernel.features(clean)
        grams = self.kernel.gram_from_features(gather_global(f_clean), gather_global(f_den), gather_global(clean),
                                               gather_global(denoised))
        mmd = ESTIMATORS[self.settings.estimator](*grams)
        ce = F.cross_entropy(logits, y)
        loss = mmd + self.settings.alpha * ce
        if self.settings.adv_steps:
            route_logits = self.classifier(self._denoise_unclamped(self.route_examples(clean, y)))
            route_ce = F.cross_entropy(route_logits, y)
            loss = loss + self.settings.adv_weight * route_ce
            self.train_route_robust(route_logits, y)
            self.log("train/route_ce", route_ce)
            self.log("train/route_robust_acc", self.train_route_robust, on_step=False, on_epoch=True)
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
        if self.settings.adv_steps:
            self.val_route_robust(self.classifier(self.purify(self.route_examples(clean, y))), y)
            self.log("val/route_robust_acc", self.val_route_robust, prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.denoiser.parameters(), lr=self.settings.lr)
        if not self.settings.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.settings.milestones),
                                                     gamma=self.settings.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
