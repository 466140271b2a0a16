"""How the classifier is trained: standard training or an adversarial training method, one per file.

* ``standard``: cross-entropy on clean images (:mod:`dad.training.standard`);
* ``pgd_at`` (Madry et al. 2018), ``trades`` (Zhang et al. 2019), ``fat`` and ``fat_trades`` (Zhang et al.,
  ICML 2020), ``gairat`` and ``gair_fat`` (Zhang et al., ICLR 2021).

A new method is one :class:`~dad.training.base.TrainingMethod` subclass in its own file (with its options
dataclass) and one line of :data:`TRAINING_METHODS`; the configuration's choices (:data:`Training`), the classifier
stage and ``bench/robust.py`` read this registry. The inner maximisations are :mod:`dad.training.inner`.
"""

from typing import Any, Literal

from dad.training.base import MethodStep, TrainingAttack, TrainingMethod
from dad.training.fat import Fat
from dad.training.fat_trades import FatTrades
from dad.training.gair_fat import GairFat
from dad.training.gairat import Gairat
from dad.training.pgd_at import PgdAt
from dad.training.standard import Standard
from dad.training.trades import Trades

__all__ = ["TRAINING_METHODS", "Training", "TrainingMethod", "TrainingAttack", "MethodStep", "build_method"]

TRAINING_METHODS: dict[str, type[TrainingMethod]] = {
    "standard": Standard,
    "pgd_at": PgdAt,
    "trades": Trades,
    "fat": Fat,
    "fat_trades": FatTrades,
    "gairat": Gairat,
    "gair_fat": GairFat,
}
"""Every training method by name, in the order leaderboards list them."""

Training = Literal[tuple(TRAINING_METHODS)]  # type: ignore[valid-type]  # the configuration's choices


def build_method(name: str, attack: TrainingAttack, options: dict[str, Any]) -> TrainingMethod:
    """The method ``name`` with the training attack and its own options (a one-line error for unknown ones)."""
    if name not in TRAINING_METHODS:
        raise ValueError(f"Expected `classifier.training` in {tuple(TRAINING_METHODS)}, got {name!r}")
    method = TRAINING_METHODS[name]
    return method(attack, method.options_from(options))
