"""The published adaptive objective on the whole :class:`~dad.defense.DADDefense` (full white box).

PGD with Expectation over Transformation (EOT) over the denoiser's input noise maximises the
cross-entropy of the *defended* output plus ``mmd_weight`` times the batch's MMD score. The defense's
hard routing is evaluated at every step on the current iterate, so the gradient follows whichever path
the batch takes. The attack itself is :func:`~dad.attacks.defense_pgd.defense_pgd_attack`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dad.attacks.pgd import Objective

__all__ = ["defense_objective"]


def defense_objective(defense: nn.Module, y: Tensor, mmd_weight: float) -> Objective:
    """``x -> CE(defense(x), y) + mmd_weight * MMD^2(x, reference)`` (batch means)."""

    def objective(x_adv: Tensor) -> Tensor:
        out = defense.forward_with_info(x_adv)
        return F.cross_entropy(out.logits, y) + mmd_weight * out.score

    return objective
