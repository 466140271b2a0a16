"""Square Attack (Andriushchenko et al. 2020), Linf, with EOT: a gradient-free check for gradient masking.

Paper: 'Square Attack: a query-efficient black-box adversarial attack via random search'
(https://arxiv.org/abs/1912.00049). Random search over square windows of ``+-eps`` values: start from
vertical stripes (or a warm start, :func:`~dad.attacks.common.starting_from`), then at every query replace one
random square (per image, the same sign per channel) and keep it where the image's margin
``z_y - max_{j!=y} z_j`` (averaged over ``eot_samples`` passes of a randomised model) went down. The square's
side shrinks on AutoAttack's schedule from ``p_init = 0.8`` of the pixels. If a gradient-free attack finds errors
the gradient attacks miss, their gradients are masked.

Every query is a whole batch (a batch-level defense such as DAD routes the batch it sees); only images
not yet misclassified are changed, and the batch returned is the one ``judge`` (the real defense, on the
whole batch) got most wrong among the ones it was shown (the first one it got wrong everywhere ends the search).
The EOT passes of a query are one batched pass of the defense (:mod:`dad.runs`).

Distance measure: Linf. Inputs and outputs are images in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dad.attacks.common import (
    as_autograd_tensor,
    check_at_least_one,
    check_positive,
    check_unit_range,
    margin,
    preserve_mode,
    warm_start,
)
from dad.attacks.judging import Judge, defense_judge, error_rates, settled, with_filler
from dad.attacks.catalog import register_attack
from dad.attacks.spec import AttackSpec
from dad.runs import run_settings

__all__ = ["square", "square_fraction", "judged_queries", "square_attack", "square_defense_attack"]

P_INIT = 0.8
"""Initial share of the pixels a square covers (AutoAttack's setting for Linf)."""
_JUDGE_EVERY = 10  # queries between two whole-batch judgements (each costs `draws` passes)
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(query: int, queries: int, p_init: float = P_INIT) -> float:
    """The share of pixels the square covers at ``query`` of ``queries`` (the schedule is for 10,000 queries)."""
    scaled = int(query / queries * 10_000)
    return p_init / 2 ** sum(scaled > h for h in _HALVINGS)


def judged_queries(queries: int) -> set[int]:
    """The queries (counted from 1) after which Square judges its batch: every tenth, and the last.

    >>> sorted(judged_queries(25))
    [10, 20, 25]
    """
    return {q for q in range(1, queries + 1) if q % _JUDGE_EVERY == 0} | {queries}


def _signs(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Random ``+-1`` of ``shape``, drawn on ``like``'s device."""
    return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like) * 2.0 - 1.0


def _proposal(x: Tensor, current: Tensor, active: Tensor, side: int, eps: float,
              generator: torch.Generator | None) -> Tensor:
    """``current`` with one random ``side`` x ``side`` window per active image set to ``x +- eps`` (one sign per
    channel), in [0, 1]."""
    b, c, h, w = x.shape
    rows = torch.randint(0, h - side + 1, (b, 1, 1, 1), generator=generator, device=x.device)
    cols = torch.randint(0, w - side + 1, (b, 1, 1, 1), generator=generator, device=x.device)
    i = torch.arange(h, device=x.device).view(1, 1, h, 1)
    j = torch.arange(w, device=x.device).view(1, 1, 1, w)
    window = (i >= rows) & (i < rows + side) & (j >= cols) & (j < cols + side) & active.view(-1, 1, 1, 1)
    return (x + torch.where(window, eps * _signs((b, c, 1, 1), x, generator), current - x)).clamp(0.0, 1.0)


def square(
    margins: Callable[[Tensor, int], Tensor],
    judge: Judge,
    x: Tensor,
    eps: float,
    queries: int,
    eot_samples: int = 1,
    generator: torch.Generator | None = None,
    stop_when_settled: bool = True,
) -> Tensor:
    """Linf Square Attack on per-sample margins (lower is better for the attacker).

    Args:
        margins: ``margins(x_adv, count)``: per-sample margins ``z_y - max_{j!=y} z_j`` (positive: still correct)
            averaged over ``count`` passes of the model.
        judge: per-sample error rates of the real model on a whole batch.
        x: clean images in [0, 1], shape ``(B, C, H, W)``.
        eps: radius of the Linf ball (> 0).
        queries: random-search iterations (>= 1).
        eot_samples: passes averaged per margin (randomised models).
        generator: random generator of the search.
        stop_when_settled: return the first judged batch that is wrong for every sample in every draw
            (:func:`~dad.attacks.judging.settled`); only where ``judge`` is the model the AEs are evaluated on.

    Returns:
        Detached AEs in [0, 1] within ``eps`` of ``x``.
    """
    check_positive("eps", eps)
    check_at_least_one("queries", queries)
    check_at_least_one("eot_samples", eot_samples)
    check_unit_range(x)
    b, c, h, w = x.shape
    current = warm_start(x, eps, "linf")
    if current is None:
        current = (x + eps * _signs((b, c, 1, w), x, generator)).clamp(0.0, 1.0)
    current_margin = margins(current, eot_samples)
    judged = judged_queries(queries)
    rates = judge(current)
    if stop_when_settled and settled(rates):
        return current
    best_batch, best_errors = current, rates.sum()
    for query in range(queries):
        active = current_margin > 0  # a mask kept as a tensor: the loop reads nothing back between judgements
        side = min(max(round(math.sqrt(square_fraction(query, queries) * h * w)), 1), h - 1, w - 1)
        proposal = _proposal(x, current, active, side, eps, generator)
        proposal_margin = margins(proposal, eot_samples)
        accept = active & (proposal_margin < current_margin)
        current = torch.where(accept.view(-1, 1, 1, 1), proposal, current)
        current_margin = torch.where(accept, proposal_margin, current_margin)
        if query + 1 in judged:
            rates = judge(current)
            if stop_when_settled and settled(rates):
                return current
            better = rates.sum() >= best_errors
            best_batch, best_errors = torch.where(better, current, best_batch), torch.where(better, rates.sum(),
                                                                                            best_errors)
            if not bool((current_margin > 0).any()):  # every image misclassified: nothing left to search
                break
    return best_batch.detach()


@register_attack("square", "classifier", norms=("linf",))
def square_attack(spec: AttackSpec, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Square on the classifier alone, ``spec.steps`` queries."""
    with preserve_mode(model), torch.no_grad():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)

        def margins(z: Tensor, count: int) -> Tensor:
            return torch.stack([margin(model(z), y).neg() for _ in range(count)]).mean(0)

        return square(margins, lambda z: error_rates(model, z, y, 1), x, spec.eps, spec.steps, spec.eot_samples,
                      stop_when_settled=False)


@register_attack("square", "defense", norms=("linf",))
def square_defense_attack(spec: AttackSpec, defense: nn.Module, x: Tensor, y: Tensor,
                          filler: Tensor | None = None) -> Tensor:
    """Square through the defense (hard routing, its noise averaged over ``spec.eot_samples`` passes), ``spec.steps``
    queries; batches judged whole over ``spec.draws`` noise draws."""
    n = len(y)
    with preserve_mode(defense), torch.no_grad():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)
        known = defense.known_rows(filler) if filler is not None and run_settings().batched else None

        def margins(z: Tensor, count: int) -> Tensor:
            if not run_settings().batched:
                return torch.stack([margin(defense(with_filler(z, filler))[:n], y).neg() for _ in range(count)]).mean(0)
            logits = defense.forward_draws(z if known is not None else with_filler(z, filler), count, known,
                                           validate=False, first=n).logits
            return margin(logits.flatten(0, 1), y.repeat(count)).neg().view(count, n).mean(0)

        return square(margins, defense_judge(defense, y, spec.draws, filler), x, spec.eps, spec.steps,
                      spec.eot_samples)
