"""AutoAttack's standard version from ``torchattacks`` components, run as a cascade on still-robust inputs.

Paper: 'Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks' (Croce & Hein 2020, https://arxiv.org/abs/2003.01690). The ensemble is APGD-CE, APGD-T,
FAB-T and Square (5,000 queries) with the reference settings: ``torchattacks.AutoAttack`` itself runs
its gradient attacks for only 10 iterations, the reference implementation for 100 (``steps``).

Distance measure: Linf or L2. Inputs and outputs are images in ``[0, 1]``.
"""

from __future__ import annotations

import torch
import torchattacks
from torch import Tensor, nn
from torchattacks.attack import Attack

from dad.attacks.common import Model, Norm, check_at_least_one, check_norm, check_positive, preserve_mode, project
from dad.attacks.catalog import register_attack
from dad.attacks.spec import AttackSpec
from dad.attacks.torchattacks_adapter import TORCHATTACKS_NORMS, run_torchattacks

__all__ = ["autoattack", "SQUARE_QUERIES"]

SQUARE_QUERIES = 5000


def _standard_ensemble(model: nn.Module, norm: str, eps: float, n_classes: int, seed: int, steps: int) -> list[Attack]:
    common = {"norm": norm, "eps": eps, "seed": seed, "n_restarts": 1}
    return [
        torchattacks.APGD(model, loss="ce", steps=steps, **common),
        torchattacks.APGDT(model, n_classes=n_classes, steps=steps, **common),
        torchattacks.FAB(model, multi_targeted=True, n_classes=n_classes, steps=steps, **common),
        torchattacks.Square(model, n_queries=SQUARE_QUERIES, **common),
    ]


def autoattack(
    model: Model,
    x: Tensor,
    y: Tensor,
    norm: Norm | str = "linf",
    eps: float = 8 / 255,
    seed: int = 0,
    steps: int = 100,
) -> Tensor:
    """AutoAttack (standard version: APGD-CE, APGD-T, FAB-T, Square) on a deterministic classifier.

    Args:
        model: maps images in ``[0, 1]`` to logits.
        x: clean images in ``[0, 1]``, shape ``(B, C, H, W)``.
        y: true labels, shape ``(B,)``.
        norm: ``"linf"`` or ``"l2"`` (case-insensitive).
        eps: radius of the ball (> 0).
        seed: seed of the attacks' random starts; the global random state is restored afterwards.
        steps: iterations of APGD, APGD-T and FAB (>= 1).

    Returns:
        Detached adversarial images in ``[0, 1]``, within ``eps`` of ``x``, on ``x``'s device; inputs
        no attack could break are returned unchanged.
    """
    norm = check_norm(norm)
    check_positive("eps", eps)
    check_at_least_one("steps", steps)
    with preserve_mode(model), torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])

    def build(adapted: nn.Module) -> Attack:
        attacks = _standard_ensemble(adapted, TORCHATTACKS_NORMS[norm], eps, n_classes, seed, steps)
        return torchattacks.MultiAttack(attacks)

    x_adv = run_torchattacks(build, model, x, y)
    return (x + project(x_adv - x, eps, norm)).clamp(0.0, 1.0)


@register_attack("autoattack", "classifier")
def autoattack_attack(spec: AttackSpec, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """AutoAttack standard with ``spec.steps`` iterations per gradient attack."""
    return autoattack(model, x, y, norm=spec.norm, eps=spec.eps, seed=spec.seed, steps=spec.steps)
