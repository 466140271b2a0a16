"""Named attack presets as the evaluation runs them, and one entry point for every threat model.

An :class:`AttackPreset` is an :class:`~dad.attacks.config.AttackConfig` plus what an attack through the
whole defense optimises, so a report records every parameter of every attack. :func:`run_attack` runs
any preset:

* ``threat="classifier"``: the attacker sees only the classifier (the published tables' setting): PGD,
  MMA, C&W-L2 (``step_size`` is its Adam learning rate; its minimum-norm AEs are projected onto the
  ``eps`` ball, so its number is a robust accuracy at ``eps``) or
  AutoAttack ``standard``. Given a ``source`` model, the same attack is crafted on it instead (transfer).
* ``threat="defense"``: full white box on the whole :class:`~dad.defense.DADDefense`: the published
  adaptive PGD+EOT, the detector-evasion attacks of :mod:`dad.attacks.evasion`, or AutoAttack's ``rand``
  version on whole batches (:func:`~dad.attacks.batch_apgd.apgd_rand`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from dad.attacks._utils import check_positive, preserve_mode, project
from dad.attacks.adaptive import attack_defense
from dad.attacks.batch_apgd import apgd_rand
from dad.attacks.config import AttackConfig
from dad.attacks.evasion import EVASION_OBJECTIVES, evade, strongest_batch
from dad.attacks.external import autoattack, cw_l2

__all__ = ["AttackPreset", "DEFENSE_OBJECTIVES", "run_attack", "classifier_attack"]

DEFENSE_OBJECTIVES = ("adaptive", *EVASION_OBJECTIVES)
"""What a ``threat="defense"`` PGD maximises (see :class:`AttackPreset`)."""


@dataclass
class AttackPreset(AttackConfig):
    """Every parameter of one evaluated attack: the :class:`AttackConfig` fields and the following.

    ``step_size`` is also C&W-L2's Adam learning rate; AutoAttack's APGD adapts its own step size. AutoAttack runs
    its ``standard`` version on the classifier and its ``rand`` version (EOT) through the defense.

    Attributes:
        objective: what a ``threat="defense"`` PGD maximises. ``adaptive``: the published attack, the
            cross-entropy of the defended output (hard routing, EOT over the noise) plus ``mmd_weight``
            times the batch's MMD score. ``evade_clean``: the cross-entropy of the classifier alone
            while a hinge drives the batch's score below the threshold (so the batch skips the
            denoiser). ``evade_denoised``: the cross-entropy through noise, denoiser and classifier (EOT)
            while a hinge keeps the score above the threshold. ``evade_soft``: both paths' probabilities
            mixed by ``sigmoid((score - threshold) / |threshold| / temperature)``. ``evade_bpda``: the hard routing
            forward and that sigmoid's gradient backward. Other attacks keep ``adaptive``.
        lambdas: the schedule of penalty weights (``mmd_weight`` of the adaptive attack, the hinge
            weight of the evasion attacks); each is run and, per batch, the AEs the defense gets most
            wrong are kept (see :func:`~dad.attacks.evasion.strongest_batch`). Empty: ``[mmd_weight]``.
        temperature: width of the soft routing, as a fraction of the threshold (> 0).
        margin: the hinges aim at ``(1 - margin)`` (clean path) or ``(1 + margin)`` (denoiser path)
            times the threshold, in [0, 1).
    """

    objective: str = "adaptive"
    lambdas: list[float] = field(default_factory=list)
    temperature: float = 0.1
    margin: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in DEFENSE_OBJECTIVES:
            raise ValueError(f"Unknown objective {self.objective!r}; expected one of {DEFENSE_OBJECTIVES}")
        if self.objective != "adaptive" and (self.threat != "defense" or self.name != "pgd"):
            raise ValueError(f"Objective {self.objective!r} needs name 'pgd' and threat 'defense'")
        if self.threat == "defense" and self.name not in ("pgd", "autoattack"):
            raise ValueError(f"Attacks through the defense are 'pgd' or 'autoattack', got {self.name!r}")
        self.lambdas = [float(v) for v in self.lambdas]
        if any(v < 0 for v in self.lambdas):
            raise ValueError(f"Expected `lambdas` >= 0, got {self.lambdas}")
        check_positive("temperature", self.temperature)
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"Expected `margin` in [0, 1), got {self.margin}")

    @property
    def schedule(self) -> list[float]:
        """The penalty weights tried per batch."""
        return list(self.lambdas) or [self.mmd_weight]

    @property
    def needs_eot(self) -> bool:
        """Whether the attack's gradient passes through the defense's random noise (so EOT matters)."""
        return self.threat == "defense" and self.objective != "evade_clean"

    def scaled(self, eps_factor: float = 1.0, steps_factor: int = 1, eot_factor: int = 1,
               seed_offset: int = 0) -> "AttackPreset":
        """A variant for sanity checks: ``eps`` and ``step_size`` times ``eps_factor``, more steps or EOT samples,
        another seed (a random restart)."""
        return replace(self, eps=self.eps * eps_factor, step_size=self.step_size * eps_factor,
                       steps=self.steps * steps_factor, eot_samples=self.eot_samples * eot_factor,
                       seed=self.seed + seed_offset, lambdas=list(self.lambdas))


def classifier_attack(preset: AttackConfig, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Run a classifier-only preset on ``model`` (the defense's classifier, or a transfer source)."""
    if preset.name in ("pgd", "mma"):
        return preset.run_on_classifier(model, x, y)
    if preset.name == "cw_l2":
        if preset.norm != "l2":
            raise ValueError(f"C&W-L2 is an L2 attack; set `norm: l2`, got {preset.norm!r}")
        x_adv = cw_l2(model, x, y, steps=preset.steps, lr=preset.step_size)
        return (x + project(x_adv - x, preset.eps, "l2")).clamp(0.0, 1.0)
    with preserve_mode(model), torch.no_grad():
        n_classes = int(model(x[:1]).shape[1])
    return autoattack(model, x, y, norm=preset.norm, eps=preset.eps, version="standard", n_classes=n_classes,
                      seed=preset.seed, steps=preset.steps)


def run_attack(preset: AttackPreset, defense: nn.Module, x: Tensor, y: Tensor,
               source: nn.Module | None = None) -> Tensor:
    """Adversarial examples of one batch under ``preset``.

    Args:
        preset: the attack.
        defense: the :class:`~dad.defense.DADDefense` under evaluation.
        x: clean images in [0, 1], one evaluation batch (the defense decides per batch, so attacks through
            it must see the batch the defense will see).
        y: true labels.
        source: for a transfer attack, the model the classifier-only attack is crafted on.

    Returns:
        Detached AEs in [0, 1], within ``preset.eps`` of ``x``.
    """
    if preset.threat == "classifier":
        return classifier_attack(preset, source if source is not None else defense.classifier, x, y)
    if source is not None:
        raise ValueError("Transfer attacks are crafted on the source model: use threat 'classifier'")
    if preset.name == "autoattack":
        return apgd_rand(defense, x, y, preset.norm, preset.eps, preset.steps, preset.eot_samples, preset.seed)
    if preset.objective != "adaptive":
        return evade(defense, x, y, preset)
    candidates = [attack_defense(defense, x, y, replace(preset, mmd_weight=lam)) for lam in preset.schedule]
    if len(candidates) == 1:
        return candidates[0]
    with preserve_mode(defense):
        return strongest_batch(defense, y, candidates, draws=preset.eot_samples)
