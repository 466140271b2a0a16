"""Minimum-Margin Attack (MMA): the attack DAD uses to generate its training adversarial examples.

MMA in the paper 'Fast and Reliable Evaluation of Adversarial Robustness with Minimum-Margin Attack'
(Gao et al., ICML 2022, https://arxiv.org/abs/2206.07314): run a targeted margin attack towards each of
the ``k`` most likely wrong classes and keep, per input, the candidate with the smallest margin of the
true class, i.e. the largest ``max_{j != y} z_j - z_y`` (the most confidently misclassified).

Distance measure: Linf or L2. Inputs and outputs are images in ``[0, 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks.common import (
    Model,
    Norm,
    as_autograd_tensor,
    check_at_least_one,
    check_positive,
    gradients_enabled,
    margin,
    preserve_mode,
)
from dad.attacks.pgd import Objective, projected_gradient_ascent
from dad.attacks.catalog import register_attack
from dad.attacks.spec import AttackSpec

__all__ = ["mma"]


def _capped_target_margin(model: Model, y: Tensor, target: Tensor, confidence: float) -> Objective:
    """Objective ``min(z_t - z_y, confidence)`` per sample: push towards ``target``, stop once confident."""

    def objective(x_adv: Tensor) -> Tensor:
        logits = model(x_adv)
        gap = logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])
        return gap.squeeze(1).clamp(max=confidence)

    return objective


def mma(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    k: int = 3,
    norm: Norm | str = "linf",
    confidence: float = 50.0,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Minimum-Margin Attack: best of ``k`` targeted margin attacks per input.

    Long because its docstring gives the published settings; the body is short.

    The targets are, per input, the ``k`` classes with the highest clean logits other than the true
    one. For each target ``t`` (the loop runs over the ``k`` ranks, the batch is vectorised) PGD
    maximises ``min(z_t - z_y, confidence)``; the capped objective stops pushing once an example is
    misclassified by ``confidence``. The returned candidate is the one with the largest final margin
    ``max_{j != y} z_j - z_y`` (ties go to the higher-ranked target). Modes and gradients of the model
    are preserved (:func:`~dad.attacks.preserve_mode`).

    Args:
        model: maps images in ``[0, 1]`` of shape ``(B, C, H, W)`` to logits ``(B, K)``.
        x: clean images in ``[0, 1]``.
        y: true labels, shape ``(B,)``.
        eps: radius of the ball (> 0); DAD trains with 8/255 (CIFAR-10) and 4/255 (ImageNet), Linf.
        step_size: size of each step (> 0).
        steps: steps per target (>= 1).
        k: number of target classes, ``1 <= k <= K - 1``.
        norm: ``"linf"`` or ``"l2"`` (case-insensitive).
        confidence: cap of the targeted margin (> 0).
        random_start: start each targeted run from a random point of the ball.
        generator: random generator for the starts (on ``x``'s device).

    Returns:
        Detached adversarial images, shape of ``x``, in ``[0, 1]`` and within ``eps`` of ``x``.
    """
    check_at_least_one("k", k)
    check_positive("confidence", confidence)
    with preserve_mode(model), gradients_enabled():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)
        with torch.no_grad():
            logits = model(x)
        n_classes = logits.shape[1]
        if k > n_classes - 1:
            raise ValueError(f"Expected `k` <= number of classes - 1 = {n_classes - 1}, got {k}")
        wrong_logits = logits.masked_fill(F.one_hot(y, n_classes).bool(), float("-inf"))
        targets = wrong_logits.topk(k, dim=1).indices
        best, best_margin = x, torch.full_like(y, float("-inf"), dtype=logits.dtype)
        for rank in range(k):
            objective = _capped_target_margin(model, y, targets[:, rank], confidence)
            candidate = projected_gradient_ascent(
                objective, x, eps, step_size, steps, norm=norm, random_start=random_start, generator=generator
            )
            with torch.no_grad():
                candidate_margin = margin(model(candidate), y)
            better = candidate_margin > best_margin
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), candidate, best)
            best_margin = torch.where(better, candidate_margin, best_margin)
    return best.detach()


@register_attack("mma", "classifier")
def mma_attack(spec: AttackSpec, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """MMA on the classifier alone with the spec's settings (``k`` target classes)."""
    return mma(model, x, y, spec.eps, spec.step_size, spec.steps, k=spec.k, norm=spec.norm,
               random_start=spec.random_start)
