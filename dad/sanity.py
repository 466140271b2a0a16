"""Sanity checks of a robustness evaluation, each a pass/fail with the numbers behind it.

From Carlini et al. 2019, 'On Evaluating Adversarial Robustness' (https://arxiv.org/abs/1902.06705)
and AutoAttack's checks (Croce & Hein 2020): an evaluation whose attack is broken (masked or
non-differentiable gradients, unhandled randomness, too few iterations) over-rates the defense, and
shows it in simple ways:

* robust accuracy must not increase with ``eps``, and must reach chance at a large ``eps``;
* a stronger version of the attack (more steps, more EOT samples, another random restart) must give
  the same robust accuracy within noise: higher means the attack is not doing what it should
  (randomness, masking), lower means the reported attack had not converged;
* the full white-box attack must be at least as strong as the one that ignores the defense;
* gradients through the defense must be finite and non-zero;
* if the defense is randomised (two passes differ), every attack through it must use EOT.

Comparisons are paired (the same samples under both attacks): the tolerance is ``z`` standard errors
of the difference of two paired proportions, ``z * sqrt(discordant) / n``, plus one sample. Everything
here is model-agnostic, so the checks can be tested on toy models whose answer is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dad.attacks.common import as_autograd_tensor, gradients_enabled

__all__ = [
    "CheckResult",
    "RobustFn",
    "paired_tolerance",
    "check_non_increasing",
    "check_near_chance",
    "check_unchanged",
    "check_at_least_as_strong",
    "check_gradients",
    "is_randomized",
    "check_randomness",
    "attack_variants",
    "attack_checks",
]

RobustFn = Callable[[float, int, int, int], Tensor]
"""``robust(eps_factor, steps_factor, eot_factor, seed_offset)`` -> per-sample correctness (bool) of the
defended model under the attack with ``eps`` (and step size) times ``eps_factor``, that many times the
steps and EOT samples, and its seed shifted by ``seed_offset`` (a random restart)."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: whether it passed, and the numbers that decided it."""

    passed: bool
    detail: str

    def as_dict(self) -> dict[str, bool | str]:
        return {"passed": bool(self.passed), "detail": self.detail}


def _acc(correct: Tensor) -> float:
    return correct.float().mean().item() if correct.numel() else float("nan")


def paired_tolerance(a: Tensor, b: Tensor, z: float = 2.0) -> float:
    """Noise level of ``acc(b) - acc(a)`` for per-sample correctness of the same samples.

    ``z`` standard errors of the paired difference (``sqrt(discordant) / n``, McNemar), plus ``1/n``.
    """
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"Expected two non-empty per-sample vectors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    n = a.numel()
    discordant = (a.bool() != b.bool()).sum().item()
    return z * math.sqrt(discordant) / n + 1.0 / n


def check_non_increasing(eps: Sequence[float], correct: Sequence[Tensor], z: float = 2.0) -> CheckResult:
    """Robust accuracy must not rise (beyond noise) from one ``eps`` to the next larger one."""
    if len(eps) != len(correct) or len(eps) < 2:
        raise ValueError("Expected one correctness vector per eps, and at least two eps values")
    order = sorted(range(len(eps)), key=lambda i: eps[i])
    rises = []
    for i, j in zip(order, order[1:]):
        if _acc(correct[j]) > _acc(correct[i]) + paired_tolerance(correct[i], correct[j], z):
            rises.append(f"{eps[i]:.4g}->{eps[j]:.4g}")
    curve = ", ".join(f"{eps[i]:.4g}: {_acc(correct[i]):.3f}" for i in order)
    verdict = "non-increasing within noise" if not rises else f"rises beyond noise at {', '.join(rises)}"
    return CheckResult(not rises, f"robust accuracy by eps ({curve}): {verdict}")


def check_near_chance(correct: Tensor, num_classes: int, eps: float | None = None, z: float = 2.0) -> CheckResult:
    """At a large ``eps`` the attack must bring accuracy down to chance (``1/num_classes``) within noise."""
    if num_classes < 2:
        raise ValueError(f"Expected `num_classes` >= 2, got {num_classes}")
    n = correct.numel()
    chance = 1.0 / num_classes
    bound = chance + z * math.sqrt(chance * (1 - chance) / n) + 1.0 / n
    acc = _acc(correct)
    where = f" at eps {eps:.4g}" if eps is not None else ""
    detail = f"robust accuracy{where} {acc:.3f} vs chance {chance:.3f} (bound {bound:.3f}, n={n})"
    return CheckResult(acc <= bound, detail)


def check_unchanged(label: str, base: Tensor, variant: Tensor, z: float = 2.0) -> CheckResult:
    """A stronger variant of the attack must give the base attack's robust accuracy within noise.

    Higher: the stronger attack is weaker (randomness or masking at work). Lower: the base attack had
    not converged, so its number over-rates the defense.
    """
    tol = paired_tolerance(base, variant, z)
    a, b = _acc(base), _acc(variant)
    if b > a + tol:
        verdict = "the stronger attack is WEAKER: suspect randomness or gradient masking"
    elif b < a - tol:
        verdict = "the stronger attack is stronger: the reported attack had NOT converged"
    else:
        verdict = "unchanged within noise"
    return CheckResult(abs(b - a) <= tol, f"{label}: {a:.3f} -> {b:.3f} (tolerance {tol:.3f}): {verdict}")


def check_at_least_as_strong(label: str, strong: Tensor, weak: Tensor, z: float = 2.0) -> CheckResult:
    """The attack that should be stronger must leave no more samples correct (within noise)."""
    tol = paired_tolerance(weak, strong, z)
    a, b = _acc(strong), _acc(weak)
    return CheckResult(a <= b + tol, f"{label}: {a:.3f} vs {b:.3f} (tolerance {tol:.3f})")


def check_gradients(loss: Callable[[Tensor], Tensor], batches: Sequence[Tensor],
                    min_nonzero: float = 0.95) -> CheckResult:
    """Input gradients of ``loss`` must be finite and non-zero for (almost) every sample.

    Args:
        loss: maps a batch to per-sample losses (or a scalar); use a non-saturating loss such as the
            logit margin, so a confident but smooth model is not mistaken for a masked one.
        batches: the batches to probe (e.g. a clean one and an adversarial one, which a detector routes
            differently).
        min_nonzero: the fraction of samples whose gradient must be non-zero.
    """
    parts, passed = [], True
    for i, x in enumerate(batches):
        with gradients_enabled():
            x_var = as_autograd_tensor(x).requires_grad_(True)
            value = loss(x_var).sum()
            grad = torch.autograd.grad(value, x_var, allow_unused=True)[0]
        if grad is None:
            grad = torch.zeros_like(x_var)
        finite = bool(torch.isfinite(grad).all())
        nonzero = (grad.flatten(1).abs().sum(1) > 0).float().mean().item()
        passed &= finite and nonzero >= min_nonzero
        parts.append(f"batch {i}: {'finite' if finite else 'NON-FINITE'}, non-zero for {nonzero:.0%} of samples")
    return CheckResult(passed, "; ".join(parts) + f" (need finite and >= {min_nonzero:.0%} non-zero)")


@torch.no_grad()
def is_randomized(forward: Callable[[Tensor], Tensor], batches: Sequence[Tensor]) -> bool:
    """Whether two passes of ``forward`` on one of the batches give different outputs."""
    return any(not torch.equal(forward(x), forward(x)) for x in batches)


@torch.no_grad()
def check_randomness(forward: Callable[[Tensor], Tensor], batches: Sequence[Tensor],
                     eot_samples: Mapping[str, int]) -> CheckResult:
    """Detect a randomised model (two passes on one batch differ); if it is, every attack must use EOT.

    Args:
        forward: the model under attack.
        batches: batches to probe (a defense may be random on some routes only: probe each route).
        eot_samples: EOT samples of each attack whose gradient passes through the model's randomness.
    """
    if not is_randomized(forward, batches):
        return CheckResult(True, "two passes on each probed batch agree: deterministic, EOT not needed")
    without = sorted(name for name, k in eot_samples.items() if k < 2)
    if not eot_samples:
        return CheckResult(False, "randomised (two passes differ) but no attack through it uses EOT")
    if without:
        return CheckResult(False, f"randomised (two passes differ); attacks without EOT: {', '.join(without)}")
    used = ", ".join(f"{name} {k}" for name, k in sorted(eot_samples.items()))
    return CheckResult(True, f"randomised (two passes differ); EOT samples per attack: {used}")


def attack_variants(eps_factors: Sequence[float], randomized: bool = True) -> list[tuple[float, int, int, int]]:
    """The ``(eps_factor, steps_factor, eot_factor, seed_offset)`` runs :func:`attack_checks` asks for,
    the base run ``(1, 1, 1, 0)`` first (so a caller can run them all at once beforehand)."""
    factors = sorted({float(f) for f in eps_factors} | {1.0})
    if factors[0] <= 0:
        raise ValueError(f"Expected positive `eps_factors`, got {list(eps_factors)}")
    runs = [(1.0, 1, 1, 0)] + [(f, 1, 1, 0) for f in factors if f != 1.0] + [(1.0, 2, 1, 0)]
    return runs + [(1.0, 1, 2, 0)] * randomized + [(1.0, 1, 1, 1)]


def attack_checks(
    robust: RobustFn,
    num_classes: int,
    eps: float,
    eps_factors: Sequence[float] = (0.25, 0.5, 1.0, 1.5, 2.5),
    randomized: bool = True,
    z: float = 2.0,
) -> tuple[dict[str, CheckResult], dict[float, Tensor]]:
    """The attack-strength checks: an ``eps`` sweep, more steps, more EOT samples, a random restart.

    Args:
        robust: runs the attack and returns per-sample correctness (see :data:`RobustFn`).
        num_classes: for the chance level.
        eps: the attack's ``eps`` (to label the sweep).
        eps_factors: the sweep's multiples of ``eps`` (1 is always included); the largest one is the
            "large eps" that must reach chance.
        randomized: whether the attack's gradient passes through randomness (else the EOT check is
            skipped as not needed).
        z: noise level of the comparisons, in standard errors.

    Returns:
        ``(checks, sweep)``: checks ``eps_monotone``, ``large_eps_near_chance``, ``more_steps``,
        ``more_eot``, ``restarts``; ``sweep`` maps each eps factor to per-sample correctness.
    """
    attack_variants(eps_factors, randomized)  # validates the factors
    factors = sorted({float(f) for f in eps_factors} | {1.0})
    base = robust(1.0, 1, 1, 0).bool()
    sweep = {f: base if f == 1.0 else robust(f, 1, 1, 0).bool() for f in factors}
    checks = {
        "eps_monotone": check_non_increasing([f * eps for f in factors], [sweep[f] for f in factors], z),
        "large_eps_near_chance": check_near_chance(sweep[factors[-1]], num_classes, factors[-1] * eps, z),
        "more_steps": check_unchanged("2x steps", base, robust(1.0, 2, 1, 0).bool(), z),
        "more_eot": (check_unchanged("2x EOT samples", base, robust(1.0, 1, 2, 0).bool(), z) if randomized
                     else CheckResult(True, "the attacked path is deterministic: EOT not needed")),
        "restarts": check_unchanged("worst case of 2 random restarts", base, base & robust(1.0, 1, 1, 1).bool(), z),
    }
    return checks, sweep
