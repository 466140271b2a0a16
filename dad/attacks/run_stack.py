"""An attack's independent runs through the defense along a leading dimension, instead of one after another.

The runs of an attack through the defense (a loss of ``ce+dlr``, a penalty weight of its schedule, a restart)
differ only in their start and their objective's settings. Stacked, ``R`` runs are one tensor program: their images
go through the networks together while each run is judged as its own detector batch (:mod:`dad.defense_runs`), in
chunks of runs that keep a pass under :attr:`~dad.runs.RunSettings.max_images` images. The strongest batch is kept
as :func:`~dad.attacks.judging.strongest_run` keeps it (the runs' order and ties unchanged), and a settled run
ends the attack. Under :func:`~dad.runs.looped_runs` the runs run one after another (the reference).

The groups of a mixed-batch attack (``G`` batches of ``k`` attacked images, each among its own clean filler) are
independent batches: given as a stack ``(G, k, ...)`` with labels ``(G, k)`` and fillers ``(G, m, ...)``, all their
runs are one stack of ``G x R`` runs (group-major, :func:`~dad.defense_runs.per_run`), and each group keeps its own
strongest batch (:func:`strongest_per_group`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from dad.attacks.common import Norm, start_point
from dad.attacks.catalog import takes_groups
from dad.attacks.judging import Judge, defense_judge, ranked_mix, settled, strongest_batch, strongest_run
from dad.attacks.objectives import DefenseObjective, defense_objective
from dad.attacks.spec import AttackSpec
from dad.defense_runs import is_runs
from dad.runs import run_chunks, run_settings

__all__ = ["RunSetting", "Engine", "stacks_runs", "stacks_groups", "run_starts", "as_stack", "flat_judge", "flat_runs",
           "stacked_runs", "strongest_per_group", "spec_runs", "attack_runs"]

RunSetting = tuple[str, float]
"""One run's settings: its loss kind and its penalty weight."""
Engine = Callable[[DefenseObjective, Judge, int, int], Tensor]
"""``engine(objective, judge, runs, groups)``: one attack's ascent (APGD, PGD) of ``runs`` stacked runs on
``groups`` clean batches, their AEs ``(runs, B, ...)`` (``(B, ...)`` for one run)."""


def stacks_runs(defense: nn.Module, objective: str, runs: int) -> bool:
    """Whether an attack's ``runs`` through ``defense`` go along a leading dimension: batched runs
    (:mod:`dad.runs`), more than one, a defense that routes stacks of runs and an objective that takes them."""
    return run_settings().batched and runs > 1 and hasattr(defense, "routed_draws") and objective != "evade_eps"


def stacks_groups(spec: AttackSpec, defense: nn.Module, x: Tensor) -> bool:
    """Whether the independent batches ``x`` ``(G, k, ...)`` (a mixed-batch attack's groups of ``k`` attacked
    images) go through ``spec`` as one stack of runs: groups stacked (:attr:`~dad.runs.RunSettings.stack_groups`;
    by default off the CPU), an attack through the defense that takes them (:func:`~dad.attacks.catalog.takes_groups`),
    runs that stack (:func:`stacks_runs`), and all the groups' runs, their EOT draws whole, in one pass under the cap
    on images (else the groups run one after another)."""
    runs = len(x) * len(spec_runs(spec))
    stack = run_settings().stack_groups
    return ((x.device.type != "cpu" if stack is None else stack)
            and spec.threat == "defense" and len(x) > 1 and takes_groups(spec.name, spec.threat)
            and stacks_runs(defense, spec.objective, runs)
            and len(run_chunks(runs, x.shape[1] * spec.eot_samples, x[0, 0])) == 1)


def run_starts(x: Tensor, eps: float, norm: Norm, random_start: bool, runs: int,
               generator: torch.Generator | None = None, groups: int = 1) -> tuple[Tensor, Tensor]:
    """For ``runs`` stacked runs on the clean batch ``x`` (or, ``groups > 1``, on the clean batches ``x``
    ``(groups, B, ...)``, ``runs // groups`` runs each): each run's clean batch, flat (the ``runs x B`` batch a
    per-sample loop projects around), and each run's own start (:func:`~dad.attacks.common.start_point`), drawn run
    after run as the looped runs draw them."""
    clean = x.repeat_interleave(runs // groups, 0) if groups > 1 else x.expand(runs, *x.shape)
    starts = torch.cat([start_point(batch, eps, norm, random_start, generator) for batch in clean])
    return clean.flatten(0, 1), starts


def as_stack(z: Tensor, runs: int, batch_shape: torch.Size) -> Tensor:
    """The flat ``runs x B`` samples as the stack ``(runs, B, ...)``; one run stays the batch ``(B, ...)``."""
    return z if runs == 1 else z.view(runs, *batch_shape)


class _FlatObjective:
    """A stack-of-runs objective as a function of the flat ``(R x B, ...)`` batch (values ``(R x B,)``)."""

    def __init__(self, objective: DefenseObjective, runs: int) -> None:
        self.objective, self.runs = objective, runs

    def __call__(self, z: Tensor) -> Tensor:
        return self.draws(z, 1)[0]

    def draws(self, z: Tensor, count: int) -> Tensor:
        return self.objective.draws(z.view(self.runs, -1, *z.shape[1:]), count).flatten(1)


def flat_judge(judge: Judge, runs: int) -> Judge:
    """``judge`` of a stack of ``runs`` batches ``(runs, B, ...)`` as a function of the flat ``(runs x B, ...)`` batch
    an attack's per-sample loop works on: each run judged as its own batch (unchanged for one run)."""
    if runs == 1:
        return judge

    def judged(z: Tensor) -> Tensor:
        return judge(z.view(runs, -1, *z.shape[1:])).flatten()

    return judged


def flat_runs(objective: Callable[[Tensor], Tensor], judge: Judge,
              runs: int) -> tuple[Callable[[Tensor], Tensor], Judge]:
    """``objective`` and ``judge`` of a stack of ``runs`` batches as functions of the flat batch (:func:`flat_judge`;
    unchanged for one run)."""
    if runs == 1:
        return objective, judge
    if not isinstance(objective, DefenseObjective):
        raise TypeError(f"Stacked runs need a DefenseObjective, got {type(objective).__name__}")
    return _FlatObjective(objective, runs), flat_judge(judge, runs)


def stacked_runs(judge: Judge, settings: Sequence[RunSetting],
                 run: Callable[[tuple[str, ...], tuple[float, ...]], Tensor], x: Tensor, draws: int = 1) -> Tensor:
    """The strongest batch of the runs ``settings`` on the clean batch ``x``, made by ``run(losses, lams)`` (a
    chunk's stack ``(R, B, ...)``, or ``(B, ...)`` for one run) chunk by chunk; the first settled run is returned at
    once, as :func:`~dad.attacks.judging.strongest_run` returns it. A chunk takes the runs whose passes fit the cap
    on images whole, ``draws`` (a run's EOT samples) x ``len(x)`` images a run: a run's EOT draws are not split
    to stack more runs (which would make its deterministic part run once per split)."""
    candidates, rates, start = [], [], 0
    for size in run_chunks(len(settings), len(x) * draws, x[0]):
        part = settings[start:start + size]
        start += size
        stack = run(tuple(loss for loss, _ in part), tuple(lam for _, lam in part))
        stack = stack if size > 1 else stack[None]
        found = judge(stack)
        if settled(found, size):
            return stack[int((found >= 1.0).all(1).int().argmax())]
        candidates += list(stack)
        rates.append(found)
    return strongest_batch(judge, candidates, torch.cat(rates))


def strongest_per_group(judge: Judge, stack: Tensor, groups: int) -> Tensor:
    """Each group's strongest batch, ``(groups, B, ...)``, of the runs ``stack`` ``(groups x S, B, ...)`` on
    ``groups`` independent batches (group-major): per group, its first settled run, else what
    :func:`~dad.attacks.judging.strongest_batch` keeps of its ``S`` runs (the runs' order and ties unchanged; the
    per-sample mixes of all groups judged in one stack)."""
    per = len(stack) // groups
    stack = stack.view(groups, per, *stack.shape[1:])
    if per == 1:
        return stack[:, 0]
    rates = judge(stack.flatten(0, 1)).view(groups, per, -1)
    best, errors, mixed = ranked_mix(stack, rates)
    per_group = (groups, *([1] * (mixed.dim() - 1)))
    best = torch.where((judge(mixed).sum(1) > errors).view(per_group), mixed, best)
    if not run_settings().early_stop:
        return best
    done = (rates >= 1.0).all(2)
    first = stack[torch.arange(groups, device=stack.device), done.int().argmax(1)]
    return torch.where(done.any(1).view(per_group), first, best)


def spec_runs(spec: AttackSpec) -> list[RunSetting]:
    """The runs of an attack through the defense: one per loss of ``spec.loss``, weight of ``spec.schedule`` and
    restart, in that order."""
    return [(loss, lam) for loss in spec.losses for lam in spec.schedule for _ in range(spec.restarts)]


def attack_runs(spec: AttackSpec, defense: nn.Module, x: Tensor, y: Tensor, filler: Tensor | None,
                engine: Engine) -> Tensor:
    """The strongest batch of an attack's runs through ``defense`` (one per loss of ``spec.loss``, weight of
    ``spec.schedule`` and restart; the candidates judged whole over ``spec.draws`` draws), made by ``engine``:
    stacked where :func:`stacks_runs`, else one after another. On groups (``x`` ``(G, k, ...)``, see the module's
    docstring; only where :func:`stacks_groups`), each group's strongest batch, ``(G, k, ...)``."""
    judge = defense_judge(defense, y, spec.draws, filler)
    settings = spec_runs(spec)

    def run(losses: tuple[str, ...] | str, lams: tuple[float, ...] | float, groups: int = 1) -> Tensor:
        objective = defense_objective(defense, y, spec.objective, lams, losses, spec.temperature, spec.margin, filler)
        return engine(objective, judge, 1 if isinstance(losses, str) else len(losses), groups)

    if is_runs(defense, x):
        if not stacks_groups(spec, defense, x):
            raise ValueError(f"The {spec.name} attack cannot run {len(x)} groups of {x.shape[1]} images as one stack")
        grouped = settings * len(x)
        stack = run(tuple(loss for loss, _ in grouped), tuple(lam for _, lam in grouped), len(x))
        return strongest_per_group(judge, stack, len(x))
    if stacks_runs(defense, spec.objective, len(settings)):
        return stacked_runs(judge, settings, run, x, spec.eot_samples)
    return strongest_run(judge, [partial(run, loss, lam) for loss, lam in settings])
