"""APGD (Croce & Hein 2020) with EOT, for classifiers and for whole defenses that decide per batch.

Paper: 'Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks' (https://arxiv.org/abs/2003.01690). The step size starts at ``2 eps`` and is halved per sample at
the checkpoints ``p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` of the iterations (in the
reference implementation's integer form: the first after ``int(0.22 N)`` iterations, each later interval
``int(0.03 N)`` shorter than the previous one, down to ``int(0.06 N)``) when fewer than ``rho = 0.75`` of the
steps since the last checkpoint raised the sample's objective, or when neither the step size nor the best
objective changed; on halving, the sample restarts from its best point. Steps carry momentum
``alpha = 0.75``. Gradients and objective values are averaged over ``eot_samples`` evaluations of a
randomised model (EOT, Athalye et al. 2018).

Written for batch-level defenses such as DAD: every query is a whole batch (torchattacks' APGD attacks
only the still-robust inputs, so a batch defense would be queried on sub-batches that route differently),
and the returned AEs are the iterate that ``judge`` (the real defense, on the whole batch, over several
noise draws) gets most wrong, so a result is never a per-sample mix that was not evaluated as a batch. A judged
batch wrong for every sample in every draw ends the run (:mod:`dad.attacks.judging`); the EOT evaluations of a step
are one batched program (:mod:`dad.attacks.eot`), and the iteration keeps its masks as tensors (no host sync).

Distance measure: Linf or L2. Inputs and outputs are images in ``[0, 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dad.attacks.common import (
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
)
from dad.attacks.eot import eot_value_and_gradient
from dad.attacks.judging import Judge, error_rates, judged_steps, per_run_mask, settled, strongest_batch
from dad.attacks.objectives import DefenseObjective, PerSample, classification_loss
from dad.attacks.run_stack import as_stack, attack_runs, flat_runs, run_starts
from dad.attacks.catalog import register_attack
from dad.attacks.spec import AttackSpec

__all__ = ["apgd", "checkpoints", "apgd_attack", "apgd_defense_attack"]

_RHO = 0.75
_ALPHA = 0.75


def checkpoints(steps: int) -> list[int]:
    """The iteration counts after which APGD may halve a sample's step size (see the module docstring).

    >>> checkpoints(100)
    [22, 41, 57, 70, 80, 87, 93, 99]
    """
    first, shrink, least = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    marks, at, length = [], first, first
    while at <= steps:
        marks.append(at)
        length = max(length - shrink, least)
        at += length
    return marks


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def apgd(
    objective: PerSample,
    judge: Judge,
    x: Tensor,
    eps: float,
    steps: int,
    norm: Norm | str = "linf",
    eot_samples: int = 1,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    stop_when_settled: bool = True,
    runs: int = 1,
    groups: int = 1,
) -> Tensor:
    """Maximise ``objective`` over the ``eps``-ball around ``x`` (and [0, 1]) with APGD; return the best judged batch.

    Long because APGD's momentum, step-size halving at its checkpoints and judging are one loop (Croce and Hein 2020).

    ``runs > 1`` makes that many independent runs along a leading dimension of one tensor program (each from its own
    start): ``objective`` and ``judge`` then take the stack ``(runs, B, ...)`` (values and rates ``(runs, B)``),
    each run judged as its own batch, and the result is ``(runs, B, ...)``, each run's best judged batch; one run
    :func:`~dad.attacks.judging.settled` ends them all. ``groups > 1``: ``x`` ``(groups, B, ...)`` holds independent
    clean batches, each attacked by ``runs // groups`` consecutive runs, and the runs end once every group has a
    settled run. Inside, the runs are one flat batch of ``runs x B`` samples:
    APGD's step sizes, momentum and checkpoints are per sample, only the judged batches are per run.

    Args:
        objective: per-sample values to maximise (their sum is differentiated); may be random (EOT).
        judge: per-sample error rates of the real model on a whole batch; the judged iterate (about ten of
            them, :func:`~dad.attacks.judging.judged_steps`, and the checkpoints' iterates) or the batch of
            per-sample best points with the highest total is returned, the later one on ties.
        x: clean images in [0, 1], shape ``(B, ...)``.
        eps: radius of the ball (> 0).
        steps: iterations (>= 1).
        norm: ``linf`` or ``l2``.
        eot_samples: evaluations averaged per iteration (>= 1).
        random_start: start from a random point of the ball (else from ``x``); a warm start in force
            (:func:`~dad.attacks.common.starting_from`) replaces either.
        generator: random generator of the start.
        stop_when_settled: return the first judged batch that is wrong for every sample in every draw
            (:func:`~dad.attacks.judging.settled`); only where ``judge`` is the model the AEs are evaluated on.
        runs: independent runs made at once (see above).
        groups: independent clean batches stacked in ``x`` (see above).

    Returns:
        Detached AEs of the shape of ``x``, in [0, 1] and within ``eps`` of ``x``. The caller handles the
        model's mode and autograd (see :func:`apgd_attack`).
    """
    norm = check_norm(norm)
    check_positive("eps", eps)
    check_at_least_one("steps", steps)
    check_at_least_one("eot_samples", eot_samples)
    check_unit_range(x)

    check_at_least_one("runs", runs)
    shape = x.shape[1:] if groups > 1 else x.shape
    x, start = run_starts(x, eps, norm, random_start, runs, generator, groups)
    objective, judge = flat_runs(objective, judge, runs)

    def project_ball(z: Tensor) -> Tensor:
        return (x + project(z - x, eps, norm)).clamp(0.0, 1.0).detach()

    def shaped(z: Tensor) -> Tensor:
        return as_stack(z, runs, shape)

    current = project_ball(start)
    value, grad = eot_value_and_gradient(objective, current, eot_samples)
    rates = judge(current)
    if stop_when_settled and settled(rates, runs, groups):
        return shaped(current)
    best_batch, best_errors = current, rates.view(runs, -1).sum(1)
    best_point, best_value, best_grad = current.clone(), value.clone(), grad.clone()
    step = torch.full((len(x),), 2.0 * eps, dtype=x.dtype, device=x.device)
    previous = current
    marks = set(checkpoints(steps))
    judged = judged_steps(steps) | marks
    last_mark, successes = 0, torch.zeros(len(x), device=x.device)
    value_at_mark, step_at_mark = best_value.clone(), step.clone()
    for k in range(steps):
        z = project_ball(current + _per_sample(step, x) * normalized_step(grad, norm))
        if k == 0:
            candidate = z
        else:
            candidate = project_ball(current + _ALPHA * (z - current) + (1.0 - _ALPHA) * (current - previous))
        new_value, new_grad = eot_value_and_gradient(objective, candidate, eot_samples)
        successes += (new_value > value).float()
        improved = new_value > best_value  # masks stay tensors: no host sync in an iteration
        best_point = torch.where(_per_sample(improved, x), candidate, best_point)
        best_grad = torch.where(_per_sample(improved, x), new_grad, best_grad)
        best_value = torch.where(improved, new_value, best_value)
        if k + 1 in judged:
            rates = judge(candidate)
            errors = rates.view(runs, -1).sum(1)
            better = errors >= best_errors
            best_batch = torch.where(per_run_mask(better, x), candidate, best_batch)
            best_errors = torch.where(better, errors, best_errors)
            if stop_when_settled and settled(rates, runs, groups):
                return shaped(best_batch)
        previous, current, value, grad = current, candidate, new_value, new_grad
        if k + 1 in marks and k + 1 > last_mark:
            too_few = successes < _RHO * (k + 1 - last_mark)
            stalled = (step == step_at_mark) & (best_value == value_at_mark)
            halve = too_few | stalled
            step = torch.where(halve, step / 2.0, step)
            current = torch.where(_per_sample(halve, x), best_point, current)
            grad = torch.where(_per_sample(halve, x), best_grad, grad)
            previous = torch.where(_per_sample(halve, x), best_point, previous)
            successes.zero_()
            last_mark, value_at_mark, step_at_mark = k + 1, best_value.clone(), step.clone()
    final = judge(best_point).view(runs, -1).sum(1) > best_errors
    return shaped(torch.where(per_run_mask(final, x), best_point, best_batch).detach())


@register_attack("apgd", "classifier")
def apgd_attack(spec: AttackSpec, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """APGD on the classifier alone with the ``spec.loss`` term(s) (``ce``, ``dlr`` or both), ``spec.restarts``
    random restarts each; per sample, the AE the classifier gets wrong is kept."""
    with preserve_mode(model), gradients_enabled():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)

        def judge(z: Tensor) -> Tensor:
            return error_rates(model, z, y, 1)

        candidates = [apgd(lambda z, loss=loss: classification_loss(model(z), y, loss), judge, x, spec.eps,
                           spec.steps, spec.norm, spec.eot_samples, spec.random_start, stop_when_settled=False)
                      for loss in spec.losses for _ in range(spec.restarts)]
        return strongest_batch(judge, candidates)


@register_attack("apgd", "defense", groups=True)
def apgd_defense_attack(spec: AttackSpec, defense: nn.Module, x: Tensor, y: Tensor,
                        filler: Tensor | None = None) -> Tensor:
    """APGD with EOT through the defense on ``spec.objective``: one run per loss of ``spec.loss``, weight of
    ``spec.schedule`` and restart, every candidate judged whole over ``spec.draws`` noise draws, the strongest
    batch kept. With ``loss: ce+dlr`` and the ``adaptive`` objective this is AutoAttack's ``rand`` version on
    whole batches. Modes and gradients of the defense are restored."""
    with preserve_mode(defense), gradients_enabled():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)

        def engine(objective: DefenseObjective, judge: Judge, runs: int, groups: int) -> Tensor:
            return apgd(objective, judge, x, spec.eps, spec.steps, spec.norm, spec.eot_samples, spec.random_start,
                        runs=runs, groups=groups)

        return attack_runs(spec, defense, x, y, filler, engine)
