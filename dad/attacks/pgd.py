"""Projected gradient ascent: the generic engine and untargeted PGD on a classifier.

PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks' (Madry et al. 2018,
https://arxiv.org/abs/1706.06083), with Expectation over Transformation (Athalye et al. 2018,
https://arxiv.org/abs/1802.00420) for randomised models.

Distance measure: Linf or L2. Inputs and outputs are images in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks.common import (
    as_autograd_tensor,
    ascent_step,
    check_at_least_one,
    check_norm,
    check_positive,
    check_unit_range,
    gradients_enabled,
    margin,
    Model,
    Norm,
    preserve_mode,
    random_delta,
)
from dad.attacks.eot import eot_value_and_gradient
from dad.attacks.judging import error_rates, strongest_batch
from dad.attacks.objectives import classification_loss
from dad.attacks.catalog import register_attack
from dad.attacks.spec import AttackSpec

__all__ = ["projected_gradient_ascent", "pgd", "LOSSES", "Objective"]

Objective = Callable[[Tensor], Tensor]
"""``objective(x_adv)`` -> a scalar or per-sample values (summed) that the attack maximises."""

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ce": lambda logits, y: F.cross_entropy(logits, y, reduction="sum"),
    "margin": lambda logits, y: margin(logits, y).sum(),
    "dlr": lambda logits, y: classification_loss(logits, y, "dlr").sum(),
}
"""Untargeted losses to maximise, ``(logits, y) -> scalar``: cross-entropy, the CW margin, or DLR."""


def projected_gradient_ascent(
    objective: Objective,
    x: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm | str = "linf",
    random_start: bool = True,
    eot_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Maximise ``objective`` over the ``eps``-ball around ``x`` intersected with ``[0, 1]``.

    The engine behind every attack of this package, kept generic so that adaptive attacks on a whole
    defense (whose objective adds an MMD term to the classification loss) reuse it. Each step moves
    along the normalised gradient (Linf: its sign; L2: the per-sample unit-norm gradient), then
    projects onto the ball around ``x`` and clamps to ``[0, 1]``. Gradients are taken w.r.t. the input
    only (``torch.autograd.grad``), so no parameter ``.grad`` is ever written. The caller is
    responsible for the model's mode (see :func:`~dad.attacks.preserve_mode`).

    Args:
        objective: ``objective(x_adv)`` returns a scalar or per-sample values (summed) to maximise.
            It may be random (e.g. noise inside a defense): see ``eot_samples``.
        x: clean images of shape ``(B, ...)`` in ``[0, 1]``.
        eps: radius of the threat model's ball (> 0).
        step_size: size of each step in the attack's norm (> 0).
        steps: number of steps (>= 1).
        norm: ``"linf"`` or ``"l2"`` (case-insensitive).
        random_start: start from a random point of the ball (uniform in the Linf cube; uniform direction
            and uniform radius in the L2 ball) instead of ``x``.
        eot_samples: number of objective evaluations whose gradients are averaged at each step
            (Expectation over Transformation); 1 for deterministic objectives.
        generator: random generator for the start, on ``x``'s device; the global one when ``None``.

    Returns:
        Detached adversarial images of the shape, dtype and device of ``x``.

    Example:
        >>> x = torch.full((2, 1, 4, 4), 0.5)
        >>> objective = lambda z: z.sum()  # pushes every pixel up
        >>> x_adv = projected_gradient_ascent(objective, x, eps=0.1, step_size=0.05, steps=3, random_start=False)
        >>> torch.allclose(x_adv, torch.full_like(x, 0.6))
        True
    """
    norm = check_norm(norm)
    check_positive("eps", eps)
    check_positive("step_size", step_size)
    check_at_least_one("steps", steps)
    check_at_least_one("eot_samples", eot_samples)
    check_unit_range(x)
    with gradients_enabled():
        x = as_autograd_tensor(x)
        delta = random_delta(x, eps, norm, generator) if random_start else torch.zeros_like(x)
        x_adv = (x + delta).clamp(0.0, 1.0)
        for _ in range(steps):
            grad = eot_value_and_gradient(objective, x_adv, eot_samples)[1]
            x_adv = ascent_step(x_adv, x, grad, eps, step_size, norm)
    return x_adv.detach()


def pgd(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm | str = "linf",
    random_start: bool = True,
    eot_samples: int = 1,
    loss: str = "ce",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Untargeted PGD on a classifier: maximise its loss on the true labels within the ``eps``-ball.

    The model runs in eval mode during the attack and every submodule's mode, parameter flags and
    gradients are restored afterwards (:func:`~dad.attacks.preserve_mode`).

    Args:
        model: maps images in ``[0, 1]`` of shape ``(B, C, H, W)`` to logits ``(B, K)``.
        x: clean images in ``[0, 1]``, shape ``(B, C, H, W)``.
        y: true labels, shape ``(B,)``.
        eps: radius of the ball (> 0).
        step_size: size of each step (> 0).
        steps: number of steps (>= 1).
        norm: ``"linf"`` or ``"l2"`` (case-insensitive).
        random_start: start from a random point of the ball.
        eot_samples: gradients averaged per step, for randomised models (>= 1).
        loss: ``"ce"`` (cross-entropy), ``"margin"`` (CW: largest other logit minus true logit) or ``"dlr"``.
        generator: random generator for the start (on ``x``'s device).

    Returns:
        Detached adversarial images, shape of ``x``, in ``[0, 1]`` and within ``eps`` of ``x``.
    """
    if loss not in LOSSES:
        raise ValueError(f"Expected `loss` in {tuple(LOSSES)}, got {loss!r}")
    loss_fn = LOSSES[loss]
    with preserve_mode(model), gradients_enabled():
        y = as_autograd_tensor(y)
        return projected_gradient_ascent(
            lambda x_adv: loss_fn(model(x_adv), y),
            x,
            eps,
            step_size,
            steps,
            norm=norm,
            random_start=random_start,
            eot_samples=eot_samples,
            generator=generator,
        )


@register_attack("pgd", "classifier")
def pgd_attack(spec: AttackSpec, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """PGD on the classifier alone with the spec's settings: one run per loss of ``spec.loss`` and restart (EOT if
    ``eot_samples`` > 1); per sample, the AE the classifier gets wrong is kept."""
    candidates = [pgd(model, x, y, spec.eps, spec.step_size, spec.steps, spec.norm, spec.random_start,
                      spec.eot_samples, loss=loss) for loss in spec.losses for _ in range(spec.restarts)]
    with preserve_mode(model):
        return strongest_batch(lambda z: error_rates(model, z, as_autograd_tensor(y), 1), candidates)
