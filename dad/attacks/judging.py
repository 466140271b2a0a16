"""How attacks judge their candidate batches, keep the strongest, and stop once nothing can change.

An attack through a batch-level defense returns a batch the real defense was shown whole: its iterates and its
runs (losses, penalty weights, restarts) are judged by ``judge`` (the defense on the whole batch over ``draws``
noise draws) and the batch it gets most wrong is kept. A judged batch in which every sample is wrong in every
draw cannot be beaten, so an attack stops there (:func:`settled`, :attr:`~dad.runs.RunSettings.early_stop`): the
rest of its budget could not change any sample's judged result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dad.attacks.common import check_at_least_one
from dad.defense_runs import forward_runs, is_runs, per_run
from dad.runs import record_stop, run_settings

__all__ = ["Judge", "error_rates", "defense_judge", "judged_steps", "judged_ascent", "per_run_mask", "settled",
           "strongest_batch", "ranked_mix", "strongest_run", "with_filler"]

Judge = Callable[[Tensor], Tensor]
"""``judge(x_adv)`` -> per-sample error rates ``(n,)`` of the real defense on the whole batch ``x_adv``."""


def with_filler(x: Tensor, filler: Tensor | None) -> Tensor:
    """The batch the defense sees: the attacked images, then the clean filler (if any)."""
    return x if filler is None else torch.cat([x, filler.to(x)])


@torch.no_grad()
def error_rates(model: nn.Module, x: Tensor, y: Tensor, draws: int = 1, filler: Tensor | None = None) -> Tensor:
    """Per-sample misclassification rate of ``model`` on the whole batch ``cat(x, filler)`` over ``draws`` passes.

    A model with ``forward_draws`` (:meth:`~dad.defense.DADDefense.forward_draws`) makes all draws in one call,
    drawing only its random part again.
    """
    check_at_least_one("draws", draws)
    batch = with_filler(x, filler)
    if hasattr(model, "forward_draws"):
        logits = model.forward_draws(batch, draws).logits
    else:
        logits = torch.stack([model(batch) for _ in range(draws)])
    return (logits[:, : len(y)].argmax(2) != y).float().mean(0)


def defense_judge(defense: nn.Module, y: Tensor, draws: int, filler: Tensor | None = None) -> Judge:
    """The judge of an attack through ``defense``: :func:`error_rates` over ``draws`` draws on ``cat(x, filler)``;
    batched (:mod:`dad.runs`), without host synchronisation on an accelerator, the filler's classifier pass made once
    for the whole attack, and a stack of runs ``(R, n, ...)`` judged run by run in one program
    (:mod:`dad.defense_runs`). Labels ``(G, n)`` and a filler ``(G, m, ...)`` are those of ``G`` groups of runs
    (:func:`~dad.defense_runs.per_run`; batched only)."""
    check_at_least_one("draws", draws)
    if not run_settings().batched:
        return lambda z: error_rates(defense, z, y, draws, filler)
    known = defense.known_rows(filler) if filler is not None else None

    @torch.no_grad()
    def judge(z: Tensor) -> Tensor:  # the attack's iterates are valid images: no checks, no host syncs
        if is_runs(defense, z):  # a stack of runs (R, n, ...), each judged as its own batch: rates (R, n)
            logits = forward_runs(defense, z, draws, known, first=y.shape[-1]).logits
        else:
            logits = defense.forward_draws(z, draws, known, validate=False, first=len(y)).logits
        return (logits.argmax(-1) != (per_run(y, len(z)) if y.dim() == 2 else y)).float().mean(0)

    return judge


def judged_steps(steps: int, every: int = 10) -> set[int]:
    """The iterations (counted from 1) after which an attack judges its current batch: about ``every`` of them
    spread over the run, the last one included. Judging costs ``draws`` passes of the defense, several times a
    gradient step's cost, so attacks judge a sample of their iterates rather than all of them.

    >>> sorted(judged_steps(20))
    [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    """
    stride = max(1, steps // every)
    return {k for k in range(1, steps + 1) if k % stride == 0} | {steps}


def judged_ascent(judge: Judge, x_adv: Tensor, steps: int, step: Callable[[Tensor], Tensor], runs: int = 1,
                  groups: int = 1) -> Tensor:
    """``steps`` iterations ``x_adv = step(x_adv)`` from the start ``x_adv``, judged at the start and after the steps
    of :func:`judged_steps`: the judged iterate with the most errors is returned (ties go to the later one), a
    :func:`settled` one at once. With ``runs`` batches stacked in ``x_adv`` (flat, ``runs x B`` samples, ``judge``
    giving their rates), each run keeps its own best judged batch and the runs end once each of their ``groups``
    (independent batches, :func:`~dad.defense_runs.per_run`) has a settled run, each run's best returned."""
    rates = judge(x_adv)
    if settled(rates, runs, groups):
        return x_adv.detach()
    best, best_errors = x_adv, rates.view(runs, -1).sum(1)
    judged = judged_steps(steps)
    for k in range(1, steps + 1):
        x_adv = step(x_adv).detach()
        if k in judged:
            rates = judge(x_adv)
            errors = rates.view(runs, -1).sum(1)
            better = errors >= best_errors
            best = torch.where(per_run_mask(better, x_adv), x_adv, best)
            best_errors = torch.where(better, errors, best_errors)
            if settled(rates, runs, groups):
                return best.detach()
    return best.detach()


def per_run_mask(chosen: Tensor, like: Tensor) -> Tensor:
    """A per-run choice ``(R,)`` for each of the ``R x B`` flat samples of ``like``, broadcastable against it."""
    return chosen.repeat_interleave(len(like) // len(chosen)).view(-1, *([1] * (like.dim() - 1)))


def settled(rates: Tensor, runs: int = 1, groups: int = 1) -> bool:
    """Whether an attack stops on a batch judged with per-sample error ``rates``: every sample wrong in every draw
    (no candidate can do better), and early stopping on (:class:`~dad.runs.RunSettings`); for ``runs`` batches
    stacked along ``rates``' first dimension, whether one of them is, and for runs on ``groups`` independent batches
    (group-major), whether each group has one. A host sync: attacks ask at their judged steps only."""
    if not run_settings().early_stop:
        return False
    done = (rates.reshape(runs, -1) >= 1.0).all(1).view(groups, -1).any(1).all()
    if bool(done):
        record_stop()
        return True
    return False


def strongest_batch(judge: Judge, candidates: Sequence[Tensor], rates: Tensor | None = None) -> Tensor:
    """The candidate batch the defense gets most wrong, or a per-sample mix of them if that is stronger.

    Every candidate is a whole batch of AEs for the same clean batch, judged whole (``judge``, or the given
    per-candidate ``rates`` of shape ``(len(candidates), n)``); the mix takes, per sample, the candidate it is most
    often misclassified in (the best batch on ties) and is itself judged whole. The batch with the highest total
    error wins (the earlier one on ties): per-sample worst cases are kept without ever scoring an image outside a
    real batch.
    """
    if not candidates:
        raise ValueError("Expected at least one candidate batch")
    if len(candidates) == 1:
        return candidates[0]
    if rates is None:
        rates = torch.stack([judge(c) for c in candidates])
    best, errors, mixed = ranked_mix(torch.stack(list(candidates))[None], rates[None])
    return torch.where(judge(mixed[0]).sum() > errors[0], mixed[0], best[0])


def ranked_mix(stack: Tensor, rates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For ``G`` independent sets of ``S`` candidate batches ``stack`` ``(G, S, B, ...)`` judged with ``rates``
    ``(G, S, B)``: per set, its best batch ``(G, B, ...)`` (the highest total error, the earlier on ties), that total
    ``(G,)``, and the per-sample mix ``(G, B, ...)`` taking each sample from the candidate it is most often
    misclassified in (the best batch on ties), for the caller to judge whole (:func:`strongest_batch`)."""
    rows = torch.arange(len(stack), device=stack.device)[:, None]
    order = rates.sum(2).argsort(dim=1, descending=True, stable=True)
    ranked, ranked_rates = stack[rows, order], rates[rows, order]
    mixed = ranked[rows, ranked_rates.argmax(1), torch.arange(stack.shape[2], device=stack.device)]
    return ranked[:, 0], ranked_rates[:, 0].sum(1), mixed


def strongest_run(judge: Judge, runs: Sequence[Callable[[], Tensor]]) -> Tensor:
    """The strongest batch (:func:`strongest_batch`) of an attack's runs, each a call giving a candidate batch.

    With early stopping, each candidate is judged when its run ends and the first :func:`settled` one is returned
    without running the rest (the earliest batch wins ties, so the rest could not be chosen); otherwise every run
    runs, then every candidate is judged (the reference order).
    """
    if not runs:
        raise ValueError("Expected at least one run")
    if len(runs) == 1 or not run_settings().early_stop:
        return strongest_batch(judge, [run() for run in runs])
    candidates, rates = [], []
    for run in runs:
        candidates.append(run())
        rates.append(judge(candidates[-1]))
        if settled(rates[-1]):
            return candidates[-1]
    return strongest_batch(judge, candidates, torch.stack(rates))
