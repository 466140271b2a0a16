"""``gair_fat``: GAIRAT's weights on FAT's early-stopped path (Zhang et al., ICLR 2021)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dad.attacks.common import Model
from dad.training.base import check_non_negative
from dad.training.fat import Fat
from dad.training.gairat import reweighted_loss
from dad.training.inner import InnerMaximum

__all__ = ["GairFat", "GairFatOptions"]


@dataclass(frozen=True)
class GairFatOptions:
    """``lam`` (GAIRAT's lambda, -1) and ``omega`` (FAT's Gaussian term, 0.001)."""

    lam: float = -1.0
    omega: float = 0.001

    def __post_init__(self) -> None:
        check_non_negative("omega", self.omega)


class GairFat(Fat):
    """GAIR-FAT."""

    name = "gair_fat"
    Options = GairFatOptions

    def outer(self, model: Model, x: Tensor, y: Tensor, logits: Tensor, inner: InnerMaximum,
              progress: float) -> Tensor:
        return reweighted_loss(self, logits, y, inner, progress)
