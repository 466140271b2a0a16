"""Choosing the purification timesteps on held-out data: ``t*`` for fixed-t purification, ``b`` for SSNI.

The rules (held-out images only, never the test split; every candidate sees the same random numbers, so the
comparison between candidates is paired; an image counts as correct only if it is right in each of ``draws``
purification runs, the evaluation's rule for randomised defenses):

* ``t*``: the largest candidate whose purified clean accuracy stays within ``max_clean_drop`` of the
  classifier's own clean accuracy. More noise washes out larger perturbations, so the most noise the clean
  budget allows is the robust choice; accuracy on adversarial examples crafted against the classifier
  alone says little about a white-box attacker and is reported beside it, not used.
* ``b`` (per SSNI mapping, at the chosen ``t*``): the candidate with the highest mean of the purified clean
  accuracy and the purified accuracy on those adversarial examples (ties: the smaller ``b``). It trades the
  noise clean images get (``(t* + b) / 2`` at the mean clean EPS norm) against the noise flagged ones get
  (up to ``t* + b``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dad.diffusion.purifiers import MAPPINGS, DiffusionPurifier, Mapping, Sampler, SSNIPurifier
from dad.diffusion.schedule import DiffusionSchedule

__all__ = ["PurifierSettings", "PurifierKind", "KINDS", "MAPPING_OF", "accuracy", "select_t_star", "select_bias"]

PurifierKind = Literal["fixed", "ssni_n", "ssni_l"]
KINDS: tuple[str, ...] = ("fixed", "ssni_n", "ssni_l")
MAPPING_OF: dict[str, Mapping] = {"ssni_n": "sigmoid", "ssni_l": "linear"}
"""The SSNI kinds and their timestep mappings (:func:`~dad.diffusion.purifiers.map_timesteps`)."""


@dataclass(frozen=True)
class PurifierSettings:
    """The purifier stage: which diffusion purifiers to build from the score model, and how to choose them.

    Attributes:
        kinds: the purifiers to build, each saved as ``defense_<kind>.pt`` (routing ``always``): ``fixed``
            (DiffPure-style, one timestep ``t*``), ``ssni_n`` (SSNI's sigmoid mapping), ``ssni_l`` (its linear
            one). Empty (the default): ``train.py pipeline`` trains no score model and builds no purifier.
        sampler: the deployed reverse process, ``ddim`` (deterministic steps from each sample's own, real-valued
            timestep: attacks differentiate through it and through ``t(x)``) or ``ddpm`` (ancestral steps from
            the rounded timestep).
        ddim_steps: DDIM steps from ``t`` to 0.
        t_star_grid: candidate ``t*`` (of the schedule's 1,000 steps); one value fixes it.
        max_clean_drop: the largest drop of clean validation accuracy from the classifier's that ``t*`` may cost.
        bias_grid: candidate ``b`` of SSNI (``t* + b`` is the largest timestep); one value fixes it.
        slope: SSNI-L spans ``[0, t* + b]`` over ``mu +- slope * tau``.
        eps_num_timesteps, eps_max_timestep: ``K`` and ``t_S`` of the EPS estimate (SSNI: 10 and 20).
        select_size: validation images the selection uses (None: all of them).
        calibration_size: clean calibration images for ``mu`` and ``tau`` (None: all of them).
        batch_size: images per purification pass.
    """

    kinds: list[PurifierKind] = field(default_factory=list)
    sampler: Sampler = "ddim"
    ddim_steps: int = 10
    t_star_grid: list[int] = field(default_factory=lambda: [100])
    max_clean_drop: float = 0.03
    bias_grid: list[float] = field(default_factory=lambda: [0.0])
    slope: float = 3.0
    eps_num_timesteps: int = 10
    eps_max_timestep: float = 20.0
    select_size: int | None = None
    calibration_size: int | None = None
    batch_size: int = 100

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        checks = [
            (not unknown, f"Expected `purifier.kinds` in {KINDS}, got {unknown}"),
            (len(set(self.kinds)) == len(self.kinds), f"Expected distinct `purifier.kinds`, got {self.kinds}"),
            (self.ddim_steps >= 1, f"Expected `purifier.ddim_steps` >= 1, got {self.ddim_steps}"),
            (bool(self.t_star_grid) and all(t >= 1 for t in self.t_star_grid),
             f"Expected `purifier.t_star_grid` of timesteps >= 1, got {self.t_star_grid}"),
            (0.0 <= self.max_clean_drop <= 1.0,
             f"Expected `purifier.max_clean_drop` in [0, 1], got {self.max_clean_drop}"),
            (bool(self.bias_grid) and all(min(self.t_star_grid, default=1) + b > 0 for b in self.bias_grid),
             f"Expected `purifier.bias_grid` with t* + b > 0 for every t*, got {self.bias_grid}"),
            (self.slope > 0, f"Expected `purifier.slope` > 0, got {self.slope}"),
            (self.eps_num_timesteps >= 1, f"Expected `purifier.eps_num_timesteps` >= 1, got {self.eps_num_timesteps}"),
            (self.eps_max_timestep > 0, f"Expected `purifier.eps_max_timestep` > 0, got {self.eps_max_timestep}"),
            (self.select_size is None or self.select_size >= 2,
             f"Expected `purifier.select_size` >= 2, got {self.select_size}"),
            (self.calibration_size is None or self.calibration_size >= 2,
             f"Expected `purifier.calibration_size` >= 2, got {self.calibration_size}"),
            (self.batch_size >= 1, f"Expected `purifier.batch_size` >= 1, got {self.batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def largest_timestep(self) -> float:
        """The largest timestep any candidate purifies from (the score model must be trained up to it)."""
        return max(self.t_star_grid) + max(0.0, *self.bias_grid)


@torch.no_grad()
def accuracy(classifier: nn.Module, transform: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int,
             seed: int, draws: int = 1) -> float:
    """Share of images ``classifier(transform(x))`` gets right in each of ``draws`` runs of a random ``transform``.

    The global random state is seeded by ``seed``, so candidates that draw noise alike see the same noise (paired
    comparisons); the caller's random state is restored after.
    """
    device = next(classifier.parameters()).device
    correct = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            xb, yb = xb.to(device), yb.to(device)
            right = torch.stack([classifier(transform(xb)).argmax(1) == yb for _ in range(draws)]).all(0)
            correct += int(right.sum())
    return correct / len(y)


def select_t_star(classifier: nn.Module, model: nn.Module, schedule: DiffusionSchedule, settings: PurifierSettings,
                  clean: tuple[Tensor, Tensor], adversarial: Tensor, seed: int, draws: int = 1) -> dict[str, Any]:
    """Choose ``t*`` on held-out images (see the module docstring) and report every candidate.

    Args:
        classifier: the frozen classifier.
        model, schedule: the trained score network and its noise schedule.
        settings: the purifier settings (grid, sampler, clean budget, batch size).
        clean: held-out images in [0, 1] and their labels.
        adversarial: their adversarial examples (crafted against the classifier alone).
        seed: seed of the purification noise (the same for every candidate).
        draws: purification runs an image must be right in (the evaluation's ``draws``).

    Returns:
        ``{"t_star", "classifier_clean_acc", "within_budget", "candidates": {t: {"clean_acc", "adversarial_acc"}}}``;
        ``within_budget`` is False when no candidate met the clean budget (the smallest ``t*`` is then chosen).
    """
    x, y = clean
    base = accuracy(classifier, nn.Identity(), x, y, settings.batch_size, seed)
    candidates: dict[int, dict[str, float]] = {}
    for t_star in sorted(set(settings.t_star_grid)):
        purifier = DiffusionPurifier(model, schedule, t_star, settings.sampler, settings.ddim_steps)
        candidates[t_star] = {"clean_acc": accuracy(classifier, purifier, x, y, settings.batch_size, seed, draws),
                              "adversarial_acc": accuracy(classifier, purifier, adversarial, y, settings.batch_size,
                                                          seed, draws)}
    allowed = [t for t, r in candidates.items() if r["clean_acc"] >= base - settings.max_clean_drop]
    return {"t_star": max(allowed) if allowed else min(candidates), "classifier_clean_acc": base,
            "within_budget": bool(allowed), "candidates": candidates}


def select_bias(classifier: nn.Module, fixed: DiffusionPurifier, mapping: Mapping, biases: Sequence[float],
                settings: PurifierSettings, calibration: Tensor, clean: tuple[Tensor, Tensor], adversarial: Tensor,
                seed: int, draws: int = 1) -> tuple[SSNIPurifier, dict[str, Any]]:
    """Choose SSNI's ``b`` for one mapping on held-out images (see the module docstring).

    Args:
        classifier: the frozen classifier.
        fixed: the fixed-t purifier at the chosen ``t*`` (its network, schedule and sampler are shared).
        mapping: ``sigmoid`` (SSNI-N) or ``linear`` (SSNI-L).
        biases: the candidate ``b``.
        settings: the purifier settings (EPS estimate, slope, batch size).
        calibration: clean images whose EPS norms give ``mu`` and ``tau``.
        clean, adversarial, seed, draws: as in :func:`select_t_star`.

    Returns:
        The chosen, calibrated :class:`~dad.diffusion.purifiers.SSNIPurifier` and ``{"bias", "mu", "tau",
        "candidates": {b: {"clean_acc", "adversarial_acc", "mean_t_clean", "mean_t_adversarial"}}}``.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"Expected `mapping` in {MAPPINGS}, got {mapping!r}")
    x, y = clean
    device = next(classifier.parameters()).device
    made: dict[float, SSNIPurifier] = {}
    candidates: dict[float, dict[str, float]] = {}
    for bias in sorted(set(biases)):
        ssni = SSNIPurifier(fixed, bias, mapping, settings.slope, settings.eps_num_timesteps, settings.eps_max_timestep)
        ssni.to(device)
        if made:  # mu and tau do not depend on b: calibrate once
            first = next(iter(made.values()))
            ssni.mu.copy_(first.mu)
            ssni.tau.copy_(first.tau)
        else:
            ssni.calibrate(calibration.to(device), settings.batch_size)
        made[bias] = ssni
        with torch.no_grad():
            t_clean = torch.cat([ssni.timesteps(b.to(device)) for b in x.split(settings.batch_size)])
            t_adv = torch.cat([ssni.timesteps(b.to(device)) for b in adversarial.split(settings.batch_size)])
        candidates[bias] = {"clean_acc": accuracy(classifier, ssni, x, y, settings.batch_size, seed, draws),
                            "adversarial_acc": accuracy(classifier, ssni, adversarial, y, settings.batch_size, seed,
                                                        draws),
                            "mean_t_clean": t_clean.mean().item(), "mean_t_adversarial": t_adv.mean().item()}
    best = max(candidates, key=lambda b: (candidates[b]["clean_acc"] + candidates[b]["adversarial_acc"], -b))
    chosen = made[best]
    return chosen, {"bias": best, "mu": chosen.mu.item(), "tau": chosen.tau.item(), "candidates": candidates}
