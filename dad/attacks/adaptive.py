"""Adaptive attacks on the whole :class:`~dad.defense.DADDefense` (full white box).

The published adaptive attack: PGD with Expectation over Transformation (EOT) over the denoiser's
input noise, maximising the cross-entropy of the *defended* output plus ``mmd_weight`` times the
batch's MMD score. The defense's hard routing is evaluated at every step on the current iterate, so
the gradient follows whichever path the batch takes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dad.attacks._utils import preserve_mode
from dad.attacks.config import AttackConfig
from dad.attacks.pgd import Objective, projected_gradient_ascent

__all__ = ["defense_objective", "attack_defense"]


def defense_objective(defense: nn.Module, y: Tensor, mmd_weight: float) -> Objective:
    """``x -> CE(defense(x), y) + mmd_weight * MMD^2(x, reference)`` (batch means)."""

    def objective(x_adv: Tensor) -> Tensor:
        out = defense.forward_with_info(x_adv)
        return F.cross_entropy(out.logits, y) + mmd_weight * out.score

    return objective


def attack_defense(defense: nn.Module, x: Tensor, y: Tensor, cfg: AttackConfig) -> Tensor:
    """Run ``cfg`` (a PGD configuration) through the whole defense; returns AEs in the ball and [0, 1]."""
    if cfg.name != "pgd":
        raise ValueError(f"Attacks through the defense are PGD-based; got attack {cfg.name!r}")
    with preserve_mode(defense):
        return projected_gradient_ascent(
            defense_objective(defense, y, cfg.mmd_weight),
            x,
            cfg.eps,
            cfg.step_size,
            cfg.steps,
            cfg.norm,
            cfg.random_start,
            cfg.eot_samples,
        )
