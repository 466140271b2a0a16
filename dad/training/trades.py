"""``trades``: Zhang et al. 2019, 'Theoretically Principled Trade-off between Robustness and Accuracy'
(https://arxiv.org/abs/1901.08573): clean cross-entropy plus ``beta`` times KL(f(x) || f(x')), x' maximising the KL."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dad.attacks.common import Model
from dad.training.base import TrainingMethod, check_non_negative
from dad.training.inner import InnerMaximum, trades_examples
from dad.training.losses import trades_loss

__all__ = ["Trades", "TradesOptions"]


@dataclass(frozen=True)
class TradesOptions:
    """``beta``: the weight of the KL term (6, Zhang et al. 2019)."""

    beta: float = 6.0

    def __post_init__(self) -> None:
        check_non_negative("beta", self.beta)


class Trades(TrainingMethod):
    """TRADES."""

    name = "trades"
    Options = TradesOptions

    def inner(self, model: Model, x: Tensor, y: Tensor, progress: float) -> InnerMaximum:
        a = self.attack
        return trades_examples(model, x, a.eps, a.step_size, a.steps)

    def outer(self, model: Model, x: Tensor, y: Tensor, logits: Tensor, inner: InnerMaximum,
              progress: float) -> Tensor:
        return trades_loss(model(x), logits, y, self.options.beta)
