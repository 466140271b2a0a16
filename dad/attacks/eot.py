"""Expectation over Transformation (Athalye et al. 2018, https://arxiv.org/abs/1802.00420): an attack on a randomised
model follows the gradient of its objective averaged over several draws of the model's randomness.

An objective with a ``draws(x, count)`` method (:class:`~dad.attacks.objectives.DefenseObjective`) evaluates the
draws of a chunk at once (:mod:`dad.runs`: one backward pass per chunk); any other callable, and every objective
under :func:`~dad.runs.looped_runs`, is evaluated once per draw.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dad.runs import run_chunks, run_settings

__all__ = ["eot_value_and_gradient"]


def eot_value_and_gradient(objective: Callable[[Tensor], Tensor], x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
    """The objective's per-sample values at ``x`` and their input gradient, both averaged over ``samples`` draws.

    Args:
        objective: per-sample values ``(n,)`` (or a scalar, then every sample's value is that scalar) to maximise;
            their sum is differentiated.
        x: the batch the objective is evaluated at, shape ``(n, ...)``.
        samples: draws averaged (>= 1).

    Returns:
        ``(values, gradient)`` of shapes ``(n,)`` and ``x.shape``, detached.
    """
    value = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    grad = torch.zeros_like(x)
    draws = getattr(objective, "draws", None)
    batched = draws is not None and run_settings().batched
    for size in run_chunks(samples, len(x), x[0]) if batched else [1] * samples:
        x_var = x.detach().requires_grad_(True)
        values = draws(x_var, size) if batched else objective(x_var)  # (size, n), or (n,) / () for one draw
        grad += torch.autograd.grad(values.sum(), x_var)[0]
        value += values.detach().sum(0) if batched else values.detach()
    return value / samples, grad / samples
