"""The one typed setting of an attack: every parameter, so reports and AE caches say exactly what ran.

An :class:`AttackSpec` names a registered attack (:mod:`dad.attacks.registry`) and the threat model it
runs under. ``threat`` says what the attacker differentiates through: ``"classifier"`` (only the
undefended classifier: the published tables' setting; AEs for training the kernel and the denoiser are
made this way too) or ``"defense"`` (full white box on the whole defense). The same spec gives the same
attack wherever it runs (training AEs, evaluation, benchmarks, tests): there is one dispatcher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from dad.attacks.catalog import check_registered
from dad.attacks.common import Norm, check_at_least_one, check_norm, check_positive

__all__ = ["AttackSpec", "Threat", "THREATS", "DEFENSE_OBJECTIVES", "EVASION_OBJECTIVES"]

Threat = Literal["classifier", "defense"]
THREATS: tuple[str, ...] = ("classifier", "defense")
EVASION_OBJECTIVES: tuple[str, ...] = ("evade_clean", "evade_denoised", "evade_soft", "evade_bpda", "evade_eps")
DEFENSE_OBJECTIVES: tuple[str, ...] = ("adaptive", *EVASION_OBJECTIVES)
"""What an attack through the defense maximises (see :class:`AttackSpec`)."""


@dataclass(frozen=True)
class AttackSpec:
    """Every parameter of one attack.

    Attributes:
        name: a registered attack (``pgd``, ``mma``, ``cw_l2``, ``autoattack``, ...): see
            :func:`~dad.attacks.registry.list_attacks`.
        threat: ``classifier`` or ``defense`` (see the module docstring).
        norm: ``linf`` or ``l2``.
        eps: radius of the threat model (pixels in [0, 1]).
        step_size: PGD/MMA step size; C&W-L2's Adam learning rate.
        steps: iterations (C&W's optimisation steps; AutoAttack's APGD, APGD-T and FAB iterations).
        random_start: PGD/MMA/APGD start from a random point of the ball.
        restarts: independent runs (random restarts) per loss and penalty weight; the strongest batch is kept.
        loss: the classification term of PGD/APGD: cross-entropy (``ce``), the difference-of-logits ratio
            (``dlr``, scale-invariant, Croce & Hein 2020) or one run of each (``ce+dlr``, AutoAttack's pair).
        eot_samples: gradients averaged per step over the defense's randomness (EOT).
        draws: noise draws over which an attack through the defense judges each candidate batch (the batch
            the defense gets most wrong on average is kept).
        k: MMA's number of target classes.
        mmd_weight: the adaptive objective's weight of the batch MMD score, ``evade_eps``'s of the EPS norm (when
            ``lambdas`` is empty).
        objective: what an attack through the defense maximises. ``adaptive``: the published attack, the
            cross-entropy of the defended output (hard routing, EOT over the noise) plus ``mmd_weight``
            times the batch's MMD score. ``evade_clean``: the cross-entropy of the classifier alone while a
            hinge drives the batch's score below the threshold (so the batch skips the denoiser).
            ``evade_denoised``: the cross-entropy through noise, denoiser and classifier (EOT) while a hinge
            keeps the score above the threshold. ``evade_soft``: both paths' probabilities mixed by
            ``sigmoid((score - threshold) / |threshold| / temperature)``. ``evade_bpda``: the hard routing
            forward and that sigmoid's gradient backward. ``evade_eps``: the adaptive objective's loss minus
            the weight times the standardised EPS norm of an SSNI purifier (an input that looks clean to SSNI gets
            a small timestep, little noise), differentiated through the continuous ``t(x)``.
        lambdas: the schedule of penalty weights (``mmd_weight`` of the adaptive attack, the hinge weight of
            the evasion attacks); each is run and, per batch, the AEs the defense gets most wrong are kept.
            Empty: ``[mmd_weight]``.
        temperature: width of the soft routing, as a fraction of the threshold (> 0).
        margin: the hinges aim at ``(1 - margin)`` (clean path) or ``(1 + margin)`` (denoiser path) times the
            threshold, in [0, 1).
        batch_size: images attacked together. Training AEs are made in chunks of this size (None: 256);
            an evaluation attacks the defense's own batches (None, or the defense's batch size).
        seed: seed of the attack's randomness.
    """

    name: str = "pgd"
    threat: Threat = "classifier"
    norm: Norm = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    restarts: int = 1
    loss: Literal["ce", "dlr", "ce+dlr"] = "ce"
    eot_samples: int = 1
    draws: int = 3
    k: int = 3
    mmd_weight: float = 1.0
    objective: str = "adaptive"
    lambdas: list[float] = field(default_factory=list)
    temperature: float = 0.1
    margin: float = 0.1
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.threat not in THREATS:
            raise ValueError(f"Expected `threat` in {THREATS}, got {self.threat!r}")
        object.__setattr__(self, "norm", check_norm(self.norm))
        check_registered(self.name, self.threat, self.norm)
        object.__setattr__(self, "lambdas", [float(v) for v in self.lambdas])
        check_positive("eps", self.eps)
        check_positive("step_size", self.step_size)
        check_at_least_one("steps", self.steps)
        check_at_least_one("eot_samples", self.eot_samples)
        check_at_least_one("restarts", self.restarts)
        check_at_least_one("draws", self.draws)
        if self.loss not in ("ce", "dlr", "ce+dlr"):
            raise ValueError(f"Expected `loss` in ('ce', 'dlr', 'ce+dlr'), got {self.loss!r}")
        check_at_least_one("k", self.k)
        if self.batch_size is not None:
            check_at_least_one("batch_size", self.batch_size)
        if self.objective not in DEFENSE_OBJECTIVES:
            raise ValueError(f"Expected `objective` in {DEFENSE_OBJECTIVES}, got {self.objective!r}")
        if self.objective != "adaptive" and self.threat != "defense":
            raise ValueError(f"Objective {self.objective!r} attacks the defense: set `threat: defense`")
        if any(v < 0 for v in self.lambdas):
            raise ValueError(f"Expected `lambdas` >= 0, got {self.lambdas}")
        check_positive("temperature", self.temperature)
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"Expected `margin` in [0, 1), got {self.margin}")

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for manifests, state keys and reports)."""
        return asdict(self)

    @property
    def losses(self) -> list[str]:
        """The classification terms run (one run each)."""
        return self.loss.split("+")

    @property
    def schedule(self) -> list[float]:
        """The penalty weights tried per batch."""
        return list(self.lambdas) or [self.mmd_weight]

    @property
    def needs_eot(self) -> bool:
        """Whether the attack's gradient passes through the defense's random noise (so EOT matters)."""
        return self.threat == "defense" and self.objective != "evade_clean"

    def scaled(self, eps_factor: float = 1.0, steps_factor: int = 1, eot_factor: int = 1,
               seed_offset: int = 0) -> AttackSpec:
        """A variant for sanity checks: ``eps`` and ``step_size`` times ``eps_factor``, more steps or EOT samples,
        another seed (a random restart)."""
        return replace(self, eps=self.eps * eps_factor, step_size=self.step_size * eps_factor,
                       steps=self.steps * steps_factor, eot_samples=self.eot_samples * eot_factor,
                       seed=self.seed + seed_offset)
