"""PGD through the whole :class:`~dad.defense.DADDefense` (full white box): the adaptive attack and detector evasion.

The published adaptive attack (:func:`~dad.attacks.adaptive.defense_objective`) maximises the
cross-entropy of the defended output plus a weight times the batch's MMD score, EOT over the noise.

DAD routes a *batch*: if its MMD score exceeds the threshold every image goes through noise, denoiser
and classifier, else straight to the classifier. An attacker who knows this can

* ``evade_clean``: fool the classifier alone while driving the batch's score below the threshold, so
  the denoiser is never used (a hinge ``lambda * relu(excess + margin)`` on the relative excess
  ``(score - threshold) / |threshold|``);
* ``evade_denoised``: fool the denoiser path (EOT over its noise) while keeping the batch flagged;
* ``evade_soft`` / ``evade_bpda``: cross the hard routing decision, which has no gradient, with a
  relaxation ``p = sigmoid(excess / temperature)`` mixing both paths' probabilities (Athalye et al.
  2018, https://arxiv.org/abs/1802.00420): ``soft`` uses ``p`` forward and backward, ``bpda`` the hard
  decision forward and the sigmoid's gradient backward (so the loss value is the real one).

Every run keeps, per batch, the iterate that the real defense misclassifies most (one noisy draw per
step), and a schedule of penalty weights keeps the strongest of its runs (:func:`strongest_batch`):
the returned AEs are always a real batch, evaluated whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks._utils import (
    Norm,
    as_autograd_tensor,
    check_at_least_one,
    check_norm,
    check_positive,
    check_unit_range,
    gradients_enabled,
    normalized_step,
    preserve_mode,
    project,
    random_delta,
)
from dad.attacks.adaptive import defense_objective
from dad.attacks.pgd import Objective, expected_gradient, projected_gradient_ascent
from dad.attacks.registry import register_attack
from dad.attacks.spec import EVASION_OBJECTIVES, AttackSpec

__all__ = ["routed_objective", "defense_pgd", "strongest_batch", "evade", "defense_pgd_attack"]

_TINY = 1e-12


def _relative_excess(score: Tensor, threshold: Tensor) -> Tensor:
    """``(score - threshold) / |threshold|``: positive exactly when the batch is flagged."""
    return (score - threshold) / threshold.abs().clamp_min(_TINY)


def routed_objective(
    defense: nn.Module,
    y: Tensor,
    objective: str,
    lam: float,
    threshold: Tensor,
    temperature: float = 0.1,
    margin: float = 0.1,
) -> Objective:
    """The scalar an evasion attack maximises on a batch (see the module docstring).

    Args:
        defense: a :class:`~dad.defense.DADDefense`.
        y: true labels of the batch.
        objective: one of :data:`EVASION_OBJECTIVES`.
        lam: weight of the hinge on the detector's score (>= 0).
        threshold: the detector's threshold for this batch size.
        temperature: width of the sigmoid relaxation, relative to the threshold (> 0).
        margin: how far below (clean path) or above (denoiser path) the threshold the hinge aims.
    """
    if objective not in EVASION_OBJECTIVES:
        raise ValueError(f"Expected `objective` in {EVASION_OBJECTIVES}, got {objective!r}")
    if lam < 0:
        raise ValueError(f"Expected `lam` >= 0, got {lam}")
    check_positive("temperature", temperature)

    def value(x_adv: Tensor) -> Tensor:
        logits_clean, features = defense.classify_with_features(x_adv)
        excess = _relative_excess(defense.detector.score(x_adv, features), threshold)
        if objective == "evade_clean":
            return F.cross_entropy(logits_clean, y) - lam * F.relu(excess + margin)
        logits_denoised = defense.classifier(defense.purify(x_adv))
        if objective == "evade_denoised":
            return F.cross_entropy(logits_denoised, y) - lam * F.relu(margin - excess)
        soft = torch.sigmoid(excess / temperature)
        p = soft if objective == "evade_soft" else (excess > 0).to(soft) + soft - soft.detach()
        probs = (1.0 - p) * logits_clean.softmax(1) + p * logits_denoised.softmax(1)
        return F.nll_loss(probs.clamp_min(_TINY).log(), y) - lam * F.relu(excess + margin)

    return value


@torch.no_grad()
def _error_rates(defense: nn.Module, x: Tensor, y: Tensor, draws: int) -> Tensor:
    """Per-sample misclassification rate of the defense on the whole batch ``x`` over ``draws`` passes."""
    wrong = torch.zeros(len(y), dtype=torch.float32, device=y.device)
    for _ in range(draws):
        wrong += (defense(x).argmax(1) != y).float()
    return wrong / draws


def defense_pgd(
    defense: nn.Module,
    objective: Objective,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm | str = "linf",
    random_start: bool = True,
    eot_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD with EOT on ``objective``, returning the iterate whose batch the defense misclassifies most.

    Each step follows the (EOT-averaged) gradient as :func:`~dad.attacks.projected_gradient_ascent`
    does; after it, the real defense classifies the whole batch once and the iterate with the most
    errors so far is kept (ties go to the later iterate). The caller handles the defense's mode.

    Args:
        defense: maps a batch in [0, 1] to logits (decides per batch).
        objective: scalar to maximise, ``objective(x_adv)``.
        x: clean batch in [0, 1]; y: its labels.
        eps, step_size, steps, norm, random_start, eot_samples, generator: as in PGD.

    Returns:
        Detached AEs of the shape of ``x``, in [0, 1] and within ``eps`` of ``x``.
    """
    norm = check_norm(norm)
    check_positive("eps", eps)
    check_positive("step_size", step_size)
    check_at_least_one("steps", steps)
    check_at_least_one("eot_samples", eot_samples)
    check_unit_range(x)
    delta = random_delta(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    x_adv = (x + delta).clamp(0.0, 1.0)
    best, best_errors = x_adv, _error_rates(defense, x_adv, y, 1).sum()
    for _ in range(steps):
        grad = expected_gradient(objective, x_adv, eot_samples)
        x_adv = x_adv + step_size * normalized_step(grad, norm)
        x_adv = (x + project(x_adv - x, eps, norm)).clamp(0.0, 1.0).detach()
        errors = _error_rates(defense, x_adv, y, 1).sum()
        if errors >= best_errors:
            best, best_errors = x_adv, errors
    return best.detach()


def strongest_batch(defense: nn.Module, y: Tensor, candidates: Sequence[Tensor], draws: int = 1) -> Tensor:
    """The candidate batch the defense gets most wrong, or a per-sample mix of them if that is stronger.

    Every candidate is a whole batch of AEs for the same clean batch. Each is classified whole by the
    defense ``draws`` times; the mix takes, per sample, the candidate it is most often misclassified in
    (the best batch on ties) and is itself classified whole. The batch with the highest mean error
    wins: per-sample worst cases are kept without ever scoring an image outside a real batch.

    Args:
        defense: maps a batch to logits.
        y: the labels.
        candidates: AE batches of identical shape.
        draws: defense passes per candidate (more for a randomised defense).
    """
    if not candidates:
        raise ValueError("Expected at least one candidate batch")
    check_at_least_one("draws", draws)
    rates = torch.stack([_error_rates(defense, c, y, draws) for c in candidates])
    order = rates.sum(1).argsort(descending=True, stable=True)
    stacked = torch.stack(list(candidates))[order]
    pick = rates[order].argmax(0)
    mixed = stacked[pick, torch.arange(len(y), device=pick.device)]
    best = stacked[0]
    if _error_rates(defense, mixed, y, draws).sum() > rates[order[0]].sum():
        return mixed
    return best


def evade(defense: nn.Module, x: Tensor, y: Tensor, cfg: AttackSpec) -> Tensor:
    """Run a detector-evasion preset (``cfg.objective`` in :data:`EVASION_OBJECTIVES`) on one batch.

    One :func:`defense_pgd` run per weight of ``cfg.schedule``; the strongest batch is returned
    (:func:`strongest_batch`, with ``cfg.eot_samples`` draws). Modes, parameter flags and gradients of
    the defense are restored afterwards.

    Args:
        defense: a calibrated :class:`~dad.defense.DADDefense`.
        x: a batch of the evaluation's batch size, in [0, 1]; y: its labels.
        cfg: the attack (its ``objective``, ``schedule``, ``temperature`` and ``margin`` are used).

    Returns:
        Detached AEs in [0, 1] within ``cfg.eps`` of ``x``.
    """
    with preserve_mode(defense), gradients_enabled():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)
        threshold = defense.detector.threshold_for(x.shape[0]).detach()
        candidates = []
        for lam in cfg.schedule:
            objective = routed_objective(defense, y, cfg.objective, lam, threshold, cfg.temperature, cfg.margin)
            candidates.append(defense_pgd(defense, objective, x, y, cfg.eps, cfg.step_size, cfg.steps, cfg.norm,
                                          cfg.random_start, cfg.eot_samples))
        if len(candidates) == 1:
            return candidates[0]
        return strongest_batch(defense, y, candidates, draws=cfg.eot_samples)


@register_attack("pgd", "defense")
def defense_pgd_attack(spec: AttackSpec, defense: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """PGD through the defense on ``spec.objective``: the adaptive attack (one run per weight of
    ``spec.schedule``, the strongest batch kept) or a detector-evasion attack (:func:`evade`)."""
    if spec.objective != "adaptive":
        return evade(defense, x, y, spec)
    with preserve_mode(defense), gradients_enabled():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)
        candidates = [projected_gradient_ascent(defense_objective(defense, y, lam), x, spec.eps, spec.step_size,
                                                spec.steps, spec.norm, spec.random_start, spec.eot_samples)
                      for lam in spec.schedule]
        if len(candidates) == 1:
            return candidates[0]
        return strongest_batch(defense, y, candidates, draws=spec.eot_samples)
