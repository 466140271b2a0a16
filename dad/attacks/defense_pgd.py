"""PGD with EOT through the whole :class:`~dad.defense.DADDefense` (full white box), on any defense objective.

The published adaptive attack and the detector-evasion attacks (:mod:`dad.attacks.objectives`) share one
engine: fixed-size steps along the EOT-averaged gradient (Madry et al. 2018, Athalye et al. 2018). About
ten iterates spread over the run (the last included) are judged by the real defense on the whole batch over
``draws`` noise draws and the one it gets most wrong is kept; a schedule of penalty weights (``lambdas``)
runs once per weight and keeps the strongest batch (:func:`~dad.attacks.judging.strongest_run`). The
returned AEs are always a real batch, judged whole; a batch judged wrong for every sample in every draw ends the
attack (:mod:`dad.attacks.judging`).

Distance measure: Linf or L2. Inputs and outputs are images in ``[0, 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dad.attacks.common import (
    as_autograd_tensor,
    ascent_step,
    check_at_least_one,
    check_norm,
    check_positive,
    check_unit_range,
    gradients_enabled,
    Norm,
    preserve_mode,
)
from dad.attacks.eot import eot_value_and_gradient
from dad.attacks.judging import Judge, judged_ascent
from dad.attacks.objectives import DefenseObjective, PerSample
from dad.attacks.run_stack import as_stack, attack_runs, flat_runs, run_starts
from dad.attacks.catalog import register_attack
from dad.attacks.spec import AttackSpec

__all__ = ["defense_pgd", "defense_pgd_attack"]


def defense_pgd(
    objective: PerSample,
    judge: Judge,
    x: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm | str = "linf",
    random_start: bool = True,
    eot_samples: int = 1,
    generator: torch.Generator | None = None,
    runs: int = 1,
    groups: int = 1,
) -> Tensor:
    """PGD with EOT on ``objective``, returning the iterate the defense gets most wrong.

    Each step follows the EOT-averaged gradient as :func:`~dad.attacks.projected_gradient_ascent` does; after
    the steps of :func:`~dad.attacks.judging.judged_steps`, ``judge`` scores the whole batch and the iterate
    with the most errors so far is kept (ties go to the later iterate); a :func:`~dad.attacks.judging.settled`
    iterate ends the run. The caller handles the defense's mode and autograd.

    Args:
        objective: per-sample values to maximise (:data:`~dad.attacks.objectives.PerSample`).
        judge: per-sample error rates of the real defense on a whole batch.
        x: clean batch in [0, 1].
        eps, step_size, steps, norm, random_start, eot_samples, generator: as in PGD (a warm start in force,
            :func:`~dad.attacks.common.starting_from`, replaces the random start).
        runs: independent runs along a leading dimension, each from its own start: ``objective`` and ``judge``
            then take the stack ``(runs, B, ...)`` (:mod:`dad.attacks.run_stack`).
        groups: independent clean batches stacked in ``x`` ``(groups, B, ...)``, each attacked by
            ``runs // groups`` consecutive runs (:func:`~dad.attacks.judging.judged_ascent`).

    Returns:
        Detached AEs of the shape of ``x`` (``(runs, *x.shape)`` for several runs), in [0, 1] and within ``eps`` of
        ``x``.
    """
    norm = check_norm(norm)
    check_positive("eps", eps)
    check_positive("step_size", step_size)
    check_at_least_one("steps", steps)
    check_at_least_one("eot_samples", eot_samples)
    check_unit_range(x)

    check_at_least_one("runs", runs)
    shape = x.shape[1:] if groups > 1 else x.shape
    x, start = run_starts(x, eps, norm, random_start, runs, generator, groups)
    objective, judge = flat_runs(objective, judge, runs)

    def step(x_adv: Tensor) -> Tensor:
        grad = eot_value_and_gradient(objective, x_adv, eot_samples)[1]
        return ascent_step(x_adv, x, grad, eps, step_size, norm)

    return as_stack(judged_ascent(judge, start.clamp(0.0, 1.0), steps, step, runs, groups), runs, shape)


@register_attack("pgd", "defense", groups=True)
def defense_pgd_attack(spec: AttackSpec, defense: nn.Module, x: Tensor, y: Tensor,
                       filler: Tensor | None = None) -> Tensor:
    """PGD through the defense on ``spec.objective`` with the ``spec.loss`` term(s): one run per loss, weight of
    ``spec.schedule`` and restart (stacked along a leading dimension, :mod:`dad.attacks.run_stack`), the strongest
    batch kept. Modes and gradients of the defense are restored."""
    with preserve_mode(defense), gradients_enabled():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)

        def engine(objective: DefenseObjective, judge: Judge, runs: int, groups: int) -> Tensor:
            return defense_pgd(objective, judge, x, spec.eps, spec.step_size, spec.steps, spec.norm,
                               spec.random_start, spec.eot_samples, runs=runs, groups=groups)

        return attack_runs(spec, defense, x, y, filler, engine)
