"""Adversarial training's inner maximisations and the outer losses' pieces (the methods: :mod:`dad.training`).

The methods, all for the Linf threat model with images in ``[0, 1]``:

* PGD-AT, 'Towards Deep Learning Models Resistant to Adversarial Attacks' (Madry et al. 2018,
  https://arxiv.org/abs/1706.06083): cross-entropy on PGD examples from a uniform random start.
* TRADES, 'Theoretically Principled Trade-off between Robustness and Accuracy' (Zhang et al. 2019,
  https://arxiv.org/abs/1901.08573): clean cross-entropy plus ``beta`` times KL(f(x) || f(x')), x' maximising the KL.
* FAT, 'Attacks Which Do Not Kill Training Make Adversarial Learning Stronger' (Zhang et al., ICML 2020,
  https://arxiv.org/abs/2002.11242): friendly examples from early-stopped PGD-K-tau (FAT-TRADES: with the KL).
* GAIRAT, 'Geometry-aware Instance-reweighted Adversarial Training' (Zhang et al., ICLR 2021,
  https://arxiv.org/abs/2010.01736): cross-entropy weighted by how close each sample is to the decision
  boundary, measured by kappa, the number of PGD iterates still classified correctly (GAIR-FAT: on FAT's path).

Every inner maximisation runs the model in eval mode with frozen parameters (:func:`~dad.attacks.preserve_mode`:
batch-norm statistics are neither used from the batch nor updated, no parameter ``.grad`` is written) and
takes gradients w.r.t. the input only; each submodule's mode is restored afterwards, so the outer step
runs in the caller's (training) mode. New tensors follow the inputs' device.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from dad.attacks.common import (
    Model,
    as_autograd_tensor,
    ascent_step,
    check_positive,
    check_unit_range,
    gradients_enabled,
    preserve_mode,
    project,
    random_delta,
)

__all__ = ["FAT_TAU_SCHEDULE", "FAT_TRADES_TAU_SCHEDULE", "InnerMaximum", "fat_examples", "pgd_at_examples",
           "trades_examples"]

InnerLoss = Literal["ce", "kl"]

TRADES_START_STD = 0.001
"""Standard deviation of TRADES' Gaussian start around ``x`` (Zhang et al. 2019's code)."""

FAT_TAU_SCHEDULE: tuple[tuple[float, ...], tuple[int, ...]] = ((0.4, 0.75), (0, 1, 2))
"""FAT's tau: 0 for the first 40% of the epochs, 1 until 75%, then 2 (epochs 50 / 90 of 120 in Zhang et al. 2020)."""

FAT_TRADES_TAU_SCHEDULE: tuple[tuple[float, ...], tuple[int, ...]] = ((0.35, 0.6, 0.8), (0, 1, 2, 3))
"""FAT-TRADES' tau: 0, 1, 2, 3 switching at 35%, 60% and 80% of the epochs (epochs 30 / 50 / 70 of 85)."""


class InnerMaximum(NamedTuple):
    """The result of an inner maximisation, one entry per sample.

    Attributes:
        examples: detached adversarial examples, shape of ``x``, in ``[0, 1]`` and within ``eps`` of ``x``.
        steps: the number of gradient steps (backward passes) taken per sample, ``(B,)`` int64.
        kappa: GAIRAT's geometry value, ``(B,)`` int64: how many of the iterates at which a gradient was taken
            (the start and the intermediate ones; for FAT the path up to its stop) the model classifies
            correctly; None without labels (TRADES).
    """

    examples: Tensor
    steps: Tensor
    kappa: Tensor | None


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected `{name}` to be an integer >= 0, got {value!r}")


def _ascend(
    model: Model,
    x: Tensor,
    y: Tensor | None,
    start: Tensor,
    loss: InnerLoss,
    eps: float,
    step_size: float,
    steps: int,
    tau: int | None = None,
    omega: float = 0.0,
    generator: torch.Generator | None = None,
) -> InnerMaximum:
    """Signed-gradient ascent on a per-sample loss from ``x + start``, projected on the Linf ball and ``[0, 1]``.

    Long because FAT's early stopping, GAIRAT's kappa and the ascent are one loop over the samples still running.

    With ``tau`` (which needs ``y``), a sample stops at the first iterate that is misclassified once its
    budget of ``tau`` misclassified iterates is spent (FAT's Algorithm 1); the others go on, so each
    iteration forwards only the samples still running.
    """
    check_positive("eps", eps)
    check_positive("step_size", step_size)
    _check_count("steps", steps)
    check_unit_range(x)
    with preserve_mode(model), gradients_enabled():
        x = as_autograd_tensor(x)
        labels = None if y is None else as_autograd_tensor(y)
        if loss == "kl":
            with torch.no_grad():
                clean = F.softmax(model(x), dim=1)  # f(x), a constant target of the KL

        def objective(logits: Tensor, index: Tensor) -> Tensor:
            if loss == "kl":
                return F.kl_div(F.log_softmax(logits, dim=1), clean[index], reduction="none").sum(dim=1)
            assert labels is not None  # checked by the public functions
            return F.cross_entropy(logits, labels[index], reduction="none")

        batch = x.shape[0]
        taken = torch.zeros(batch, dtype=torch.long, device=x.device)
        kappa = torch.zeros_like(taken)
        budget = torch.full_like(taken, tau or 0)
        running = torch.ones(batch, dtype=torch.bool, device=x.device)
        x_adv = (x + project(start, eps, "linf")).clamp(0.0, 1.0)
        for _ in range(steps):
            index = running.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            x_var = x_adv[index].requires_grad_(True)
            logits = model(x_var)
            go_on = torch.ones_like(index, dtype=torch.bool)
            if labels is not None:
                wrong = logits.argmax(dim=1) != labels[index]
                kappa[index] += (~wrong).long()
                if tau is not None:
                    go_on = ~(wrong & (budget[index] == 0))
                    budget[index] -= (wrong & go_on).long()
                    running[index] = go_on
            value = objective(logits, index)[go_on].sum()
            grad = torch.autograd.grad(value, x_var)[0][go_on]
            rows = index[go_on]
            noise = (omega * torch.randn(grad.shape, generator=generator, dtype=x.dtype, device=x.device)
                     if omega > 0 else None)
            x_adv = x_adv.index_put((rows,), ascent_step(x_adv[rows], x[rows], grad, eps, step_size, "linf", noise))
            taken[rows] += 1
    return InnerMaximum(x_adv.detach(), taken, None if labels is None else kappa)


def pgd_at_examples(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> InnerMaximum:
    """PGD-AT's (and GAIRAT's) examples: PGD-K on the cross-entropy from a uniform start in the Linf ball.

    Madry et al. 2018; GAIRAT (Zhang et al. 2021) uses the same path and counts ``kappa`` along it.

    Args:
        model: maps images in ``[0, 1]`` of shape ``(B, C, H, W)`` to logits ``(B, K)``.
        x: clean images in ``[0, 1]``.
        y: true labels, ``(B,)``.
        eps: radius of the Linf ball (> 0); 8/255 on CIFAR-10.
        step_size: size of each signed step (> 0); 2/255 on CIFAR-10.
        steps: number of steps K (>= 0; 0 returns the random start); 10 in the papers.
        generator: random generator of the start, on ``x``'s device; the global one when None.

    Returns:
        The examples, ``steps`` taken per sample (all K) and ``kappa`` (in ``[0, K]``).
    """
    start = random_delta(x, eps, "linf", generator)
    return _ascend(model, x, y, start, "ce", eps, step_size, steps, generator=generator)


def trades_examples(
    model: Model,
    x: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> InnerMaximum:
    """TRADES' examples: K signed steps ascending KL(f(x) || f(x')) from ``x + 0.001 N(0, 1)``.

    Zhang et al. 2019. ``f`` is the softmax output; f(x) is a constant target. The small Gaussian start is
    needed: the KL and its gradient vanish at ``x' = x``. Labels are not used.

    Args:
        model: maps images in ``[0, 1]`` to logits.
        x: clean images in ``[0, 1]``.
        eps: radius of the Linf ball (> 0); 8/255 on CIFAR-10.
        step_size: size of each signed step (> 0); 0.007 on CIFAR-10.
        steps: number of steps K (>= 0); 10 in the paper.
        generator: random generator of the start, on ``x``'s device.

    Returns:
        The examples, ``steps`` (all K) and no ``kappa``.
    """
    start = TRADES_START_STD * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return _ascend(model, x, None, start, "kl", eps, step_size, steps, generator=generator)


def fat_examples(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    tau: int,
    omega: float = 0.001,
    loss: InnerLoss = "ce",
    generator: torch.Generator | None = None,
) -> InnerMaximum:
    """FAT's friendly examples: early-stopped PGD-K-tau (Zhang et al., ICML 2020, Algorithm 1).

    Per sample, the iterate is checked before each step: a misclassified iterate spends one unit of the
    ``tau`` budget, and the first misclassified iterate found with the budget spent is returned. So a sample
    first misclassified at iterate ``m`` (and staying so) takes ``min(m + tau, K)`` steps; tau = 0 stops at the
    first misclassified iterate, a sample never misclassified runs all K steps, and tau >= K is PGD-K. Each
    step adds ``omega * N(0, 1)`` to the signed gradient step before the projection.

    Start: ``x`` itself for the cross-entropy (FAT, as the paper's Algorithm 1; the authors' code defaults
    to a uniform start), ``x + 0.001 N(0, 1)`` for the KL (FAT-TRADES, as TRADES: the KL's gradient
    vanishes at ``x``).

    Args:
        model: maps images in ``[0, 1]`` to logits.
        x: clean images in ``[0, 1]``.
        y: true labels, ``(B,)`` (the stopping rule needs them with either loss).
        eps: radius of the Linf ball (> 0).
        step_size: size of each signed step (> 0).
        steps: the most steps K (>= 0).
        tau: extra steps after misclassification (>= 0): see :data:`FAT_TAU_SCHEDULE`.
        omega: standard deviation of the Gaussian term of each step (>= 0); 0.001 in the paper.
        loss: ``"ce"`` (FAT) or ``"kl"`` (FAT-TRADES: KL(f(x) || f(x'))).
        generator: random generator of the start and the Gaussian terms, on ``x``'s device.

    Returns:
        The stopped iterates, the ``steps`` each sample took and ``kappa`` along its path.
    """
    _check_count("tau", tau)
    if not omega >= 0:
        raise ValueError(f"Expected `omega` >= 0, got {omega}")
    if loss not in ("ce", "kl"):
        raise ValueError(f"Expected `loss` in ('ce', 'kl'), got {loss!r}")
    if loss == "kl":
        start = TRADES_START_STD * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    else:
        start = torch.zeros_like(x)
    return _ascend(model, x, y, start, loss, eps, step_size, steps, tau=tau, omega=omega, generator=generator)
