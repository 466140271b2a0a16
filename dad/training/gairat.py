"""``gairat``: Zhang et al., ICLR 2021, 'Geometry-aware Instance-reweighted Adversarial Training'
(https://arxiv.org/abs/2010.01736): PGD-AT's path, its cross-entropy weighted by how close each sample is to the
decision boundary (kappa: the PGD iterates still classified correctly), uniform weights for the first half."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.nn import functional as F

from dad.attacks.common import Model
from dad.training.base import TrainingMethod
from dad.training.inner import InnerMaximum
from dad.training.losses import gairat_weights, global_mean
from dad.training.pgd_at import PgdAt

__all__ = ["Gairat", "GairatOptions", "reweighted_loss"]


@dataclass(frozen=True)
class GairatOptions:
    """``lam``: lambda in ``(1 + tanh(lam + 5 (1 - 2 kappa / K))) / 2`` (-1, Zhang et al. 2021)."""

    lam: float = -1.0


def reweighted_loss(method: TrainingMethod, logits: Tensor, y: Tensor, inner: InnerMaximum,
                    progress: float) -> Tensor:
    """GAIRAT's loss: plain cross-entropy for the first half of the epochs, then weighted by kappa (the weights
    normalised over the global batch, so that DDP's averaged gradient is the single-process one)."""
    if progress < 0.5:
        return F.cross_entropy(logits, y)
    assert inner.kappa is not None  # every labelled path counts kappa
    weights = gairat_weights(inner.kappa, method.attack.steps, method.options.lam, mean=global_mean)
    return (weights * F.cross_entropy(logits, y, reduction="none")).mean()


class Gairat(PgdAt):
    """GAIRAT."""

    name = "gairat"
    Options = GairatOptions

    def outer(self, model: Model, x: Tensor, y: Tensor, logits: Tensor, inner: InnerMaximum,
              progress: float) -> Tensor:
        return reweighted_loss(self, logits, y, inner, progress)
