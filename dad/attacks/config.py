"""Attack configurations as plain data, and one entry point that runs any of them.

A configuration records every parameter of an attack, so reports and AE caches can say exactly what
was run. ``threat`` says what the attacker differentiates through: ``"classifier"`` (the attacker sees
only the undefended classifier: the published tables' setting) or ``"defense"`` (full white box on the
whole :class:`~dad.defense.DADDefense`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dad.attacks._utils import check_at_least_one, check_norm, check_positive, preserve_mode
from dad.attacks.external import autoattack, cw_l2
from dad.attacks.mma import mma
from dad.attacks.pgd import pgd

__all__ = ["AttackConfig", "ATTACK_NAMES", "THREATS"]

ATTACK_NAMES = ("pgd", "mma", "cw_l2", "autoattack")
THREATS = ("classifier", "defense")


@dataclass
class AttackConfig:
    """Every parameter of one attack.

    Attributes:
        name: ``pgd``, ``mma``, ``cw_l2`` or ``autoattack``.
        threat: ``classifier`` or ``defense`` (see the module docstring).
        norm: ``linf`` or ``l2``.
        eps: radius of the threat model (pixels in [0, 1]).
        step_size: PGD/MMA step size.
        steps: iterations (also C&W's optimisation steps).
        random_start: PGD/MMA start from a random point of the ball.
        eot_samples: gradients averaged per step over the defense's randomness.
        k: MMA's number of target classes.
        mmd_weight: weight of the batch MMD score in the adaptive objective on a defense.
        batch_size: images per attacked batch (detection is per batch, so it is part of the result).
        seed: seed of the attack's randomness.
    """

    name: Literal["pgd", "mma", "cw_l2", "autoattack"] = "pgd"
    threat: Literal["classifier", "defense"] = "classifier"
    norm: Literal["linf", "l2"] = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    eot_samples: int = 1
    k: int = 3
    mmd_weight: float = 1.0
    batch_size: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in ATTACK_NAMES:
            raise ValueError(f"Unknown attack {self.name!r}; expected one of {ATTACK_NAMES}")
        if self.threat not in THREATS:
            raise ValueError(f"Unknown threat {self.threat!r}; expected one of {THREATS}")
        self.norm = check_norm(self.norm)
        check_positive("eps", self.eps)
        check_positive("step_size", self.step_size)
        check_at_least_one("steps", self.steps)
        check_at_least_one("eot_samples", self.eot_samples)
        check_at_least_one("k", self.k)
        check_at_least_one("batch_size", self.batch_size)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def run_on_classifier(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Attack the classifier ``model`` alone (``threat="classifier"``)."""
        if self.name == "pgd":
            return pgd(model, x, y, self.eps, self.step_size, self.steps, self.norm, self.random_start, self.eot_samples)
        if self.name == "mma":
            return mma(model, x, y, self.eps, self.step_size, self.steps, k=self.k, norm=self.norm,
                       random_start=self.random_start)
        if self.name == "cw_l2":
            return cw_l2(model, x, y, steps=self.steps)
        with preserve_mode(model), torch.no_grad():
            n_classes = int(model(x[:1]).shape[1])
        return autoattack(model, x, y, norm=self.norm, eps=self.eps, n_classes=n_classes, seed=self.seed)
