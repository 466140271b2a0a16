"""``fat``: Zhang et al., ICML 2020, 'Attacks Which Do Not Kill Training Make Adversarial Learning Stronger'
(https://arxiv.org/abs/2002.11242): cross-entropy on friendly examples from early-stopped PGD-K-tau, tau following
the paper's schedule over the epochs (:data:`~dad.training.inner.FAT_TAU_SCHEDULE`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dad.attacks.common import Model
from dad.training.base import TrainingMethod, check_non_negative
from dad.training.inner import FAT_TAU_SCHEDULE, InnerMaximum, fat_examples
from dad.training.losses import tau_schedule

__all__ = ["Fat", "FatOptions"]


@dataclass(frozen=True)
class FatOptions:
    """``omega``: the standard deviation of the Gaussian term of each step (0.001, Zhang et al. 2020)."""

    omega: float = 0.001

    def __post_init__(self) -> None:
        check_non_negative("omega", self.omega)


class Fat(TrainingMethod):
    """FAT."""

    name = "fat"
    Options = FatOptions
    schedule = FAT_TAU_SCHEDULE
    inner_loss = "ce"

    def inner(self, model: Model, x: Tensor, y: Tensor, progress: float) -> InnerMaximum:
        a = self.attack
        return fat_examples(model, x, y, a.eps, a.step_size, a.steps, tau_schedule(progress, *self.schedule),
                            self.options.omega, loss=self.inner_loss)
