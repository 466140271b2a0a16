"""``pgd_at``: Madry et al. 2018, 'Towards Deep Learning Models Resistant to Adversarial Attacks'
(https://arxiv.org/abs/1706.06083): cross-entropy on PGD-K examples from a uniform random start."""

from __future__ import annotations

from torch import Tensor

from dad.attacks.common import Model
from dad.training.base import TrainingMethod
from dad.training.inner import InnerMaximum, pgd_at_examples

__all__ = ["PgdAt"]


class PgdAt(TrainingMethod):
    """PGD-AT."""

    name = "pgd_at"

    def inner(self, model: Model, x: Tensor, y: Tensor, progress: float) -> InnerMaximum:
        a = self.attack
        return pgd_at_examples(model, x, y, a.eps, a.step_size, a.steps)
