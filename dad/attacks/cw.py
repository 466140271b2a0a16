"""Carlini-Wagner L2 (``torchattacks.CW``), its minimum-norm AEs projected onto the ``eps`` ball.

Paper: 'Towards Evaluating the Robustness of Neural Networks' (Carlini & Wagner 2017,
https://arxiv.org/abs/1608.04644).

Distance measure: L2. Inputs and outputs are images in ``[0, 1]``.
"""

from __future__ import annotations

import torchattacks
from torch import Tensor, nn

from dad.attacks.common import Model, check_at_least_one, check_positive, project
from dad.attacks.catalog import register_attack
from dad.attacks.spec import AttackSpec
from dad.attacks.torchattacks_adapter import run_torchattacks

__all__ = ["cw_l2"]


def cw_l2(
    model: Model,
    x: Tensor,
    y: Tensor,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 100,
    lr: float = 0.01,
) -> Tensor:
    """Untargeted Carlini-Wagner L2 attack (``torchattacks.CW``; no binary search over ``c``).

    Minimises ``|x' - x|_2^2 + c * max(z_y - max_{j != y} z_j, -kappa)`` with Adam in tanh space and
    returns, per input, the smallest successful perturbation found, or the clean input if none was.

    Args:
        model: maps images in ``[0, 1]`` to logits.
        x: clean images in ``[0, 1]``, shape ``(B, C, H, W)``.
        y: true labels, shape ``(B,)``.
        c: weight of the misclassification term (> 0).
        kappa: required confidence of the misclassification (>= 0).
        steps: Adam steps (>= 1).
        lr: Adam learning rate (> 0).

    Returns:
        Detached adversarial images in ``[0, 1]`` on ``x``'s device.
    """
    check_positive("c", c)
    if not kappa >= 0:
        raise ValueError(f"Expected `kappa` >= 0, got {kappa}")
    check_at_least_one("steps", steps)
    check_positive("lr", lr)
    return run_torchattacks(lambda m: torchattacks.CW(m, c=c, kappa=kappa, steps=steps, lr=lr), model, x, y)


@register_attack("cw_l2", "classifier", norms=("l2",))
def cw_l2_attack(spec: AttackSpec, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """C&W-L2 with ``spec.step_size`` as Adam's learning rate, projected onto the L2 ball of ``spec.eps``:
    its number is then a robust accuracy at ``eps``."""
    x_adv = cw_l2(model, x, y, steps=spec.steps, lr=spec.step_size)
    return (x + project(x_adv - x, spec.eps, "l2")).clamp(0.0, 1.0)
