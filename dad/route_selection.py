"""Which purified route a defense keeps: each candidate measured under full-white-box attacks on held-out images.

DAD is only as robust as the route a flagged batch takes: an attacker who knows everything gets the batch flagged
on purpose and attacks noise, purifier and classifier together. A route weaker than the backbone alone (no
purification) makes the defense worse than no defense, so the defense stage measures each candidate route on
images used neither for checkpoint selection nor for calibration, under the evaluation's own attacks through
the defense at its budgets (the same seeds per batch, the same rule: right in every one of ``draws`` noise draws),
and keeps the one with the best worst case (the per-sample union over the attacks). Routes whose paired interval
against the best contains 0 tie; ties go to the best classifier-only robust accuracy (the published threat), then
to the cheaper route. The backbone alone is a legitimate outcome: the defense still detects and reports flagged
batches, and classifies them with the backbone.
"""

from __future__ import annotations

import time
from functools import cached_property
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dad.attacks import AttackSpec, chunk_seed, run_seeded, target_of
from dad.attacks.registry import seeded
from dad.defense import DADDefense
from dad.diffusion.selection import KINDS
from dad.purification import Purifier
from dad.stats import accuracy_interval, paired_difference_interval

__all__ = ["RouteSelectionSettings", "RouteEvidence", "measure_route", "choose_route", "select_route", "ROUTE_NAMES",
           "DIFFUSION_ROUTES"]

ROUTE_NAMES = ("denoiser", "identity")
"""Routes the defense stage can build: the run's own purifier (its denoiser) and the backbone alone."""

DIFFUSION_ROUTES: tuple[str, ...] = KINDS
"""Routes the purifier stage builds (``purifier.kinds``): with one of them named, the purifier stage chooses."""


@dataclass(frozen=True)
class RouteSelectionSettings:
    """The defense stage's choice of route (:mod:`dad.route_selection`), off by default.

    Attributes:
        routes: candidate routes, names of :data:`ROUTE_NAMES`, of ``denoisers`` or of the diffusion purifiers
            (:data:`DIFFUSION_ROUTES`, built by the purifier stage, which then makes the choice and rewrites
            ``defense.pt``) (empty: no selection, the run's denoiser; one: that route, kept without measuring).
            Two or more need ``data.selection_size`` held-out images.
        denoisers: more candidates, each a denoiser stage's checkpoint of another run by name (e.g. a denoiser
            trained against its route, ``denoiser.adv_steps``, next to the published one), put behind this run's
            noise (``denoiser.noise_std``, ``denoiser.noise``) and purified route's classifier.
        attacks: full-white-box attacks of ``eval.attacks`` the routes are measured under, at their budgets (None:
            every attack of ``eval.attacks`` through the defense). The union matters: the two routes of a defense
            fail on different images, and an attacker picks per batch which one to attack, so a route measured
            under the attacks on the purified path alone looks better than the defense it makes.
        classifier_attack: a classifier-only attack of ``eval.attacks`` breaking ties (None: none).
    """

    routes: list[str] = field(default_factory=list)
    denoisers: dict[str, str] = field(default_factory=dict)
    attacks: list[str] | None = None
    classifier_attack: str | None = "pgd_linf"

    def __post_init__(self) -> None:
        clash = sorted(set(self.denoisers) & set(ROUTE_NAMES))
        if clash:
            raise ValueError(f"`defense.select.denoisers` names {clash}, which name built-in routes: rename them")
        known = (*ROUTE_NAMES, *DIFFUSION_ROUTES, *self.denoisers)
        if set(self.routes) - set(known) or len(set(self.routes)) != len(self.routes):
            raise ValueError(f"Expected distinct `defense.select.routes` of {known}, got {self.routes}")
        if self.routes and self.attacks == []:
            raise ValueError("`defense.select.attacks` is empty: name the attacks through the defense to select by")

    @property
    def diffusion(self) -> list[str]:
        """The diffusion purifiers among ``routes`` (the purifier stage's to build)."""
        return [name for name in self.routes if name in DIFFUSION_ROUTES]

    def attack_names(self, attacks: Mapping[str, AttackSpec]) -> list[str]:
        """The names of the attacks the routes are measured under, among ``attacks`` (``eval.attacks``)."""
        if self.attacks is not None:
            return list(self.attacks)
        return [name for name, spec in attacks.items() if spec.threat == "defense"]

    def check(self, attacks: Mapping[str, AttackSpec], selection_size: int, built: Sequence[str] = ()) -> None:
        """Raise ``ValueError`` unless the named diffusion purifiers are ``built`` (``purifier.kinds``), the named
        attacks are in ``attacks`` with the right threats, and there are held-out images to select on."""
        missing = [name for name in self.diffusion if name not in built]
        if missing:
            raise ValueError(f"`defense.select.routes` names {missing}: add them to `purifier.kinds` (the purifier "
                             "stage builds them)")
        if len(self.routes) < 2:
            return
        if selection_size < 2:
            raise ValueError("`defense.select.routes` needs held-out images: set `data.selection_size` (images used "
                             "neither for checkpoint selection nor for calibration)")
        white_box = self.attack_names(attacks)
        if not white_box:
            raise ValueError("`defense.select` finds no attack through the defense in `eval.attacks`")
        named = [(name, "defense") for name in white_box]
        named += [(self.classifier_attack, "classifier")] if self.classifier_attack else []
        for name, threat in named:
            if name not in attacks or attacks[name].threat != threat:
                raise ValueError(f"`defense.select` names `{name}`: expected an attack of `eval.attacks` with "
                                 f"threat {threat}")


@dataclass
class RouteEvidence:
    """One route measured on the selection images: per attack and per sample, whether the defense was right in
    every draw; the classifier-only attack's the same way; the seconds per image of its purified path."""

    name: str
    correct: dict[str, Tensor]
    classifier_only: Tensor | None
    seconds_per_image: float

    @cached_property
    def worst(self) -> Tensor:
        """Per sample: right under every attack (the per-sample union of the attacks' successes)."""
        return torch.stack(list(self.correct.values())).all(0)

    def summary(self) -> dict[str, Any]:
        """The evidence as plain data (what ``defense.pt``, ``done.json`` and the report keep)."""
        worst = self.worst
        only = None if self.classifier_only is None else float(self.classifier_only.float().mean())
        return {"worst_case": float(worst.float().mean()), "interval": list(accuracy_interval(worst)),
                "attacks": {name: float(c.float().mean()) for name, c in self.correct.items()},
                "classifier_only": only, "seconds_per_image": self.seconds_per_image, "n": worst.numel()}


@torch.no_grad()
def _judged(defense: DADDefense, x_adv: Tensor, y: Tensor, draws: int) -> Tensor:
    return (defense.forward_draws(x_adv, draws, validate=False).logits.argmax(2) == y).all(0)


def measure_route(name: str, defense: DADDefense, attacks: Mapping[str, AttackSpec],
                  classifier_attack: AttackSpec | None, x: Tensor, y: Tensor, batch_size: int,
                  draws: int) -> RouteEvidence:
    """``defense`` (routed through the candidate's purifier) under each attack on ``(x, y)`` in batches of
    ``batch_size``, seeded per batch as the evaluation seeds its batches (attack stream 0, judging stream 1)."""
    correct: dict[str, list[Tensor]] = {key: [] for key in attacks}
    only: list[Tensor] = []
    named = [*attacks.items(), *([("", classifier_attack)] if classifier_attack is not None else [])]
    for i, start in enumerate(range(0, len(y), batch_size)):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        for key, spec in named:
            x_adv = run_seeded(spec, target_of(spec, defense), xb, yb, chunk=i)
            with seeded(chunk_seed(spec.seed, i, stream=1), xb):
                (correct[key] if key else only).append(_judged(defense, x_adv, yb, draws))
    start_time = time.perf_counter()
    with torch.no_grad():
        defense.logits_of_runs(defense.purify_runs(x, draws))
    if x.device.type == "cuda":  # the queued work finished, as the evaluation times its batches
        torch.cuda.synchronize(x.device)
    seconds = (time.perf_counter() - start_time) / (len(y) * draws)
    return RouteEvidence(name, {key: torch.cat(values).cpu() for key, values in correct.items()},
                         torch.cat(only).cpu() if only else None, seconds)


def select_route(defense: DADDefense, routes: Mapping[str, Purifier], attacks: Mapping[str, AttackSpec],
                 classifier_attack: tuple[str, AttackSpec] | None, x: Tensor, y: Tensor, batch_size: int,
                 draws: int) -> dict[str, Any]:
    """Measure each candidate purifier of ``routes`` behind ``defense`` on the held-out ``(x, y)``
    (:func:`measure_route`), keep the chosen one as the defense's purifier (:func:`choose_route`) and return the
    record kept in ``defense.route_selection``."""
    device = defense.detector.reference.device
    x, y = x.to(device), y.to(device)
    only = None if classifier_attack is None else classifier_attack[1]
    chosen, table = choose_route([
        measure_route(name, defense.with_purifier(purifier.to(device)), attacks, only, x, y, batch_size, draws)
        for name, purifier in routes.items()])
    defense.purifier = routes[chosen].to(device)
    defense.route_selection = {"chosen": chosen, "routes": table, "attacks": list(attacks),
                               "classifier_attack": None if classifier_attack is None else classifier_attack[0]}
    return defense.route_selection


def choose_route(evidence: Sequence[RouteEvidence]) -> tuple[str, dict[str, Any]]:
    """The route to keep and why: the best worst case; the routes whose paired difference against it has an
    interval containing 0 tie with it, and among them the best classifier-only accuracy wins, then the fastest.

    Returns the name and, per route, its :meth:`RouteEvidence.summary` with ``vs_best`` (the paired difference
    against the best worst case, with its interval) and ``tied``.
    """
    if not evidence:
        raise ValueError("No route to choose from")
    best = max(evidence, key=lambda e: float(e.worst.float().mean()))
    table: dict[str, dict[str, Any]] = {}
    tied = []
    for e in evidence:
        d, lo, hi = paired_difference_interval(e.worst, best.worst)
        table[e.name] = {**e.summary(), "vs_best": [d, lo, hi], "tied": e is best or lo <= 0.0 <= hi}
        if table[e.name]["tied"]:
            tied.append(e)

    def preference(e: RouteEvidence) -> tuple[float, float]:
        only = -1.0 if e.classifier_only is None else float(e.classifier_only.float().mean())
        return only, -e.seconds_per_image

    chosen = max(tied, key=preference)
    return chosen.name, table
