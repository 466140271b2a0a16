"""Square Attack (Andriushchenko et al. 2020), Linf, with EOT: a gradient-free check for gradient masking.

Paper: 'Square Attack: a query-efficient black-box adversarial attack via random search'
(https://arxiv.org/abs/1912.00049). Random search over square windows of ``+-eps`` values: start from
vertical stripes, then at every query replace one random square (per image, the same sign per channel) and
keep it where the image's margin ``z_y - max_{j!=y} z_j`` (averaged over ``eot_samples`` passes of a
randomised model) went down. The square's side shrinks on AutoAttack's schedule from ``p_init = 0.8`` of
the pixels. If a gradient-free attack finds errors the gradient attacks miss, their gradients are masked.

Every query is a whole batch (a batch-level defense such as DAD routes the batch it sees); only images
not yet misclassified are changed, and the batch returned is the one ``judge`` (the real defense, on the
whole batch) got most wrong among the ones it was shown.

Distance measure: Linf. Inputs and outputs are images in ``[0, 1]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dad.attacks.common import (
    as_autograd_tensor,
    check_at_least_one,
    check_positive,
    check_unit_range,
    margin,
    preserve_mode,
)
from dad.attacks.objectives import Judge, error_rates, with_filler
from dad.attacks.catalog import register_attack
from dad.attacks.spec import AttackSpec

__all__ = ["square", "square_fraction", "square_attack", "square_defense_attack"]

P_INIT = 0.8
"""Initial share of the pixels a square covers (AutoAttack's setting for Linf)."""
_JUDGE_EVERY = 10  # queries between two whole-batch judgements (each costs `draws` passes)
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(query: int, queries: int, p_init: float = P_INIT) -> float:
    """The share of pixels the square covers at ``query`` of ``queries`` (the schedule is for 10,000 queries)."""
    scaled = int(query / queries * 10_000)
    return p_init / 2 ** sum(scaled > h for h in _HALVINGS)


def square(
    margin_of: object,
    judge: Judge,
    x: Tensor,
    eps: float,
    queries: int,
    eot_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Linf Square Attack on per-sample margins ``margin_of(x_adv)`` (lower is better for the attacker).

    Args:
        margin_of: maps a batch to per-sample margins ``z_y - max_{j!=y} z_j`` (positive: still correct).
        judge: per-sample error rates of the real model on a whole batch.
        x: clean images in [0, 1], shape ``(B, C, H, W)``.
        eps: radius of the Linf ball (> 0).
        queries: random-search iterations (>= 1).
        eot_samples: passes averaged per margin (randomised models).
        generator: random generator of the search.

    Returns:
        Detached AEs in [0, 1] within ``eps`` of ``x``.
    """
    check_positive("eps", eps)
    check_at_least_one("queries", queries)
    check_at_least_one("eot_samples", eot_samples)
    check_unit_range(x)
    b, c, h, w = x.shape

    def margins(z: Tensor) -> Tensor:
        return torch.stack([margin_of(z) for _ in range(eot_samples)]).mean(0)

    def signs(*shape: int) -> Tensor:
        return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x) * 2.0 - 1.0

    current = (x + eps * signs(b, c, 1, w)).clamp(0.0, 1.0)
    current_margin = margins(current)
    best_batch, best_errors = current, judge(current).sum()
    for query in range(queries):
        active = current_margin > 0
        if not active.any():
            break
        side = min(max(round(math.sqrt(square_fraction(query, queries) * h * w)), 1), h - 1, w - 1)
        rows = torch.randint(0, h - side + 1, (b, 1, 1, 1), generator=generator, device=x.device)
        cols = torch.randint(0, w - side + 1, (b, 1, 1, 1), generator=generator, device=x.device)
        delta = current - x
        i = torch.arange(h, device=x.device).view(1, 1, h, 1)
        j = torch.arange(w, device=x.device).view(1, 1, 1, w)
        window = (i >= rows) & (i < rows + side) & (j >= cols) & (j < cols + side) & active.view(-1, 1, 1, 1)
        delta = torch.where(window, eps * signs(b, c, 1, 1), delta)
        proposal = (x + delta).clamp(0.0, 1.0)
        proposal_margin = margins(proposal)
        accept = active & (proposal_margin < current_margin)
        current = torch.where(accept.view(-1, 1, 1, 1), proposal, current)
        current_margin = torch.where(accept, proposal_margin, current_margin)
        if (query + 1) % _JUDGE_EVERY == 0 or query + 1 == queries:
            errors = judge(current).sum()
            if errors >= best_errors:
                best_batch, best_errors = current, errors
    return best_batch.detach()


@register_attack("square", "classifier", norms=("linf",))
def square_attack(spec: AttackSpec, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Square on the classifier alone, ``spec.steps`` queries."""
    with preserve_mode(model), torch.no_grad():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)
        return square(lambda z: margin(model(z), y).neg(), lambda z: error_rates(model, z, y, 1), x, spec.eps,
                      spec.steps, spec.eot_samples)


@register_attack("square", "defense", norms=("linf",))
def square_defense_attack(spec: AttackSpec, defense: nn.Module, x: Tensor, y: Tensor,
                          filler: Tensor | None = None) -> Tensor:
    """Square through the defense (hard routing, its noise averaged over ``spec.eot_samples`` passes), ``spec.steps``
    queries; batches judged whole over ``spec.draws`` noise draws."""
    n = len(y)
    with preserve_mode(defense), torch.no_grad():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)
        return square(lambda z: margin(defense(with_filler(z, filler))[:n], y).neg(),
                      lambda z: error_rates(defense, z, y, spec.draws, filler), x, spec.eps, spec.steps,
                      spec.eot_samples)
