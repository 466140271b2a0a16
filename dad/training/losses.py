"""The outer losses' pieces of adversarial training and the schedules they follow over the epochs.

TRADES' loss (Zhang et al. 2019), GAIRAT's instance weights (Zhang et al., ICLR 2021) normalised over the global
batch under DDP, and the piecewise-constant schedule of FAT's tau (Zhang et al., ICML 2020).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from dad.distributed import gather_global

__all__ = ["trades_loss", "gairat_weights", "global_mean", "tau_schedule"]


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES' outer loss ``CE(f(x), y) + beta * KL(softmax(f(x)) || softmax(f(x')))``, the KL averaged per sample.

    Zhang et al. 2019 (beta 6 on CIFAR-10). Gradients flow through both logits, as in the paper's code.

    Args:
        logits_clean: logits of the clean images, ``(B, K)``.
        logits_adv: logits of their adversarial examples, ``(B, K)``.
        y: true labels, ``(B,)``.
        beta: weight of the robustness term (>= 0).

    Returns:
        The scalar loss.
    """
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    return F.cross_entropy(logits_clean, y) + beta * kl


def gairat_weights(kappa: Tensor, steps: int, lam: float = -1.0, mean: Callable[[Tensor], Tensor] = torch.mean
                   ) -> Tensor:
    """GAIRAT's per-sample weights ``(1 + tanh(lam + 5 (1 - 2 kappa / K))) / 2``, normalised to mean 1.

    Zhang et al. 2021 (the ``Tanh`` rule, lambda -1): samples whose PGD path stays correctly classified
    (large kappa, far from the boundary) get small weights, those misclassified early get large ones.

    Args:
        kappa: correctly classified iterates per sample, ``(B,)`` in ``[0, K]``.
        steps: the attack's steps K (>= 1).
        lam: lambda, shifts the weights (larger: flatter).
        mean: the normaliser of the raw weights; :func:`global_mean` under DDP, so that the weights have
            mean 1 over the global batch and the averaged gradient is the single-process one.

    Returns:
        Float weights of shape ``(B,)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected `steps` to be an integer >= 1, got {steps!r}")
    raw = (1.0 + torch.tanh(lam + 5.0 * (1.0 - 2.0 * kappa.float() / steps))) / 2.0
    return raw / mean(raw)


def global_mean(values: Tensor) -> Tensor:
    """The mean of ``values`` over the global batch: the sums and counts of every DDP rank (exact, unequal
    shares included); the plain mean in one process."""
    stats = gather_global(torch.stack([values.sum(), values.new_tensor(float(values.numel()))])[None])
    return stats[:, 0].sum() / stats[:, 1].sum()


def tau_schedule(epoch_fraction: float, boundaries: Sequence[float], values: Sequence[int]) -> int:
    """A piecewise-constant schedule: ``values[i]`` once ``epoch_fraction`` reaches ``boundaries[i - 1]``.

    Args:
        epoch_fraction: the share of the training epochs done, in ``[0, 1]``.
        boundaries: increasing fractions at which the value changes.
        values: one more value than boundaries.

    Returns:
        The value in force, e.g. FAT's tau (:data:`FAT_TAU_SCHEDULE`).
    """
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"Expected one more value than boundaries, got {len(values)} and {len(boundaries)}")
    return values[bisect_right(list(boundaries), epoch_fraction)]
