"""Stage 1: train the MMD-OPT kernel by maximising the test power J on (clean, adversarial) pairs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from dad.attacks.common import Norm
from dad.distributed import gather_global
from dad.evasion import evasion_examples
from dad.kernels import SemanticKernel
from dad.mmd import j_statistic, mmd2_unbiased, mmd2_variance
from dad.networks import network_specs
from lightning_modules.stage import StageModule

__all__ = ["KernelModule", "KernelSettings"]


@dataclass(frozen=True)
class KernelSettings:
    """The kernel stage (MMD-OPT). The paper: Adam 2e-4, 200 full-batch steps (500 vs 500).

    Attributes:
        steps: optimisation steps.
        lr: Adam learning rate (small data needs more than the paper's 2e-4).
        batch_size: pairs per step and process; None trains full batch (the whole MMD set).
        train_features: also train ``phi`` (the paper's optional variant).
        feature_extractor: a factory model used as ``phi``; None: the classifier itself (one forward pass
            then gives the logits and the detector's features).
        feature_extractor_kwargs: its builder options.
        feature_extractor_ckpt: its weights (a state dict or checkpoint file).
        reg: the variance regulariser of J.
        init_eps: the initial ``eps`` of the kernel.
        adversarial: evasion-aware training (:mod:`dad.evasion`; not in the paper): each step also crafts, against
            the current kernel and the classifier, examples that lower the batch statistic and the witness score
            while raising the classifier's loss within ``adv_eps``, and maximises J between the clean images and
            the union of the fixed AEs and these (each pair takes one of the two at random).
        adv_eps, adv_step_size, adv_steps: the crafting's radius (None: the training AEs' ``attack.eps``), PGD
            step (None: a quarter of the radius) and steps, in the training AEs' norm.
        adv_weight: the weight of the detection terms against the classifier's loss.
    """

    steps: int = 200
    lr: float = 2e-4
    batch_size: int | None = None
    train_features: bool = False
    feature_extractor: str | None = None
    feature_extractor_kwargs: dict[str, Any] = field(default_factory=dict)
    feature_extractor_ckpt: str | None = None
    reg: float = 1e-8
    init_eps: float = 1e-10
    adversarial: bool = False
    adv_eps: float | None = None
    adv_step_size: float | None = None
    adv_steps: int = 5
    adv_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"Expected `kernel.steps` >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"Expected `kernel.lr` > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 2:
            raise ValueError(f"Expected an MMD batch of at least 2 (`kernel.batch_size`), got {self.batch_size}")
        if not self.reg > 0:
            raise ValueError(f"Expected `kernel.reg` > 0, got {self.reg}")
        if not 0.0 < self.init_eps < 1.0:
            raise ValueError(f"Expected `kernel.init_eps` in (0, 1), got {self.init_eps}")
        for name in ("adv_eps", "adv_step_size"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"Expected `kernel.{name}` > 0, got {getattr(self, name)}")
        if self.adv_steps < 1 or self.adv_weight < 0:
            raise ValueError(f"Expected `kernel.adv_steps` >= 1 and `kernel.adv_weight` >= 0, got {self.adv_steps} "
                             f"and {self.adv_weight}")

    def crafting(self, eps: float) -> tuple[float, float]:
        """The evasion crafting's radius and step, ``eps`` (the training AEs') where ``adv_eps`` is unset."""
        radius = self.adv_eps if self.adv_eps is not None else eps
        return radius, self.adv_step_size if self.adv_step_size is not None else radius / 4


class KernelModule(StageModule):
    """Maximises ``J = MMD^2_u / sqrt(var + reg)`` of an injected semantic kernel over the global batch.

    The bandwidths are initialised as in the paper on the first (global) batch; ``J`` at the first step is
    logged (``kernel/j_start``) and a validation pass gives ``J`` of the trained kernel on its batch
    (:attr:`j_end`, the whole MMD set in the pipeline), so a run that did not raise the test power is visible
    at once. A training step reads nothing back to the host but on the first step of a fit.

    Args:
        kernel: the :class:`~dad.kernels.SemanticKernel` (its ``phi`` frozen unless ``train_features``).
        settings: the stage's :class:`KernelSettings`.
        classifier: the classifier (recorded in the checkpoint's specs when it is the kernel's ``phi``; the
            evasion crafting's target).
        attack_eps, attack_norm: the training AEs' radius and norm (the evasion crafting's defaults).
    """

    stage = "kernel"

    def __init__(self, kernel: SemanticKernel, settings: KernelSettings = KernelSettings(),
                 classifier: torch.nn.Module | None = None, attack_eps: float = 8 / 255,
                 attack_norm: Norm = "linf") -> None:
        super().__init__()
        self.save_hyperparameters({"settings": asdict(settings)})
        self.settings = settings
        self.kernel = kernel
        self._classifier = [classifier if classifier is not None else kernel.phi]  # not a submodule: no copy saved
        self.register_buffer("j_start", torch.tensor(math.nan))
        self.j_end: float | None = None  # J of the trained kernel on the validation batch
        self._initialized = False  # the kernel's bandwidths are known to be initialised (read once per fit)
        self._crafting = (*settings.crafting(attack_eps), attack_norm)

    def on_train_start(self) -> None:
        self._initialized = bool(self.kernel.initialized)  # restored from a checkpoint when resuming

    def network_specs(self) -> dict[str, Any]:
        return network_specs(self._classifier[0], self.kernel)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        clean, adv, labels = batch
        if not self._initialized:
            # the paper's initialisation, on the global batch so that every rank starts identically
            self.kernel.init_bandwidths(gather_global(clean), gather_global(adv), eps=self.settings.init_eps)
            self._initialized = True
        if self.settings.adversarial:
            adv = self.with_evasions(clean, adv, labels)
        fx = gather_global(self.kernel.features(clean))
        fy = gather_global(self.kernel.features(adv))
        x, y = gather_global(clean), gather_global(adv)
        grams = self.kernel.gram_from_features(fx, fy, x, y)
        j = j_statistic(*grams, reg=self.settings.reg)
        self.j_start.copy_(torch.where(self.j_start.isnan(), j.detach(), self.j_start))  # the first step's J
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
        return -j

    def with_evasions(self, clean: Tensor, adv: Tensor, labels: Tensor) -> Tensor:
        """The batch's AEs with each pair's fixed AE replaced, at random with probability 1/2, by an example
        crafted against the current kernel (:func:`~dad.evasion.evasion_examples`)."""
        eps, step_size, norm = self._crafting
        crafted = evasion_examples(self.kernel, self._classifier[0], clean, labels, adv, eps, step_size,
                                   self.settings.adv_steps, self.settings.adv_weight, norm)
        take = torch.rand(len(clean), device=clean.device) < 0.5
        return torch.where(take.view(-1, *([1] * (clean.dim() - 1))), crafted, adv)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        """``J`` of the current kernel on a (clean, adversarial) batch (each rank's whole batch), into :attr:`j_end`."""
        self.j_end = j_statistic(*self.kernel.gram(batch[0], batch[1]), reg=self.settings.reg).item()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.kernel.parameters(), lr=self.settings.lr)
