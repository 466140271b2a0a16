"""``fat_trades``: FAT's early-stopped path on TRADES' KL, with TRADES' outer loss and FAT-TRADES' tau schedule
(Zhang et al., ICML 2020; :data:`~dad.training.inner.FAT_TRADES_TAU_SCHEDULE`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dad.attacks.common import Model
from dad.training.base import check_non_negative
from dad.training.fat import Fat
from dad.training.inner import FAT_TRADES_TAU_SCHEDULE, InnerMaximum
from dad.training.losses import trades_loss

__all__ = ["FatTrades", "FatTradesOptions"]


@dataclass(frozen=True)
class FatTradesOptions:
    """``omega`` (FAT's Gaussian term, 0.001) and ``beta`` (TRADES' KL weight, 6)."""

    omega: float = 0.001
    beta: float = 6.0

    def __post_init__(self) -> None:
        check_non_negative("omega", self.omega)
        check_non_negative("beta", self.beta)


class FatTrades(Fat):
    """FAT-TRADES."""

    name = "fat_trades"
    Options = FatTradesOptions
    schedule = FAT_TRADES_TAU_SCHEDULE
    inner_loss = "kl"

    def outer(self, model: Model, x: Tensor, y: Tensor, logits: Tensor, inner: InnerMaximum,
              progress: float) -> Tensor:
        return trades_loss(model(x), logits, y, self.options.beta)
