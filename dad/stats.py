"""Confidence intervals for accuracies and for differences of paired accuracies.

Every accuracy the evaluation reports is a binomial proportion over the evaluated samples, so it comes
with a 95% Wilson score interval (Wilson 1927), which keeps its coverage near 0 and 1 where the Wald
interval collapses. Two defenses evaluated on the same samples are compared with Newcombe's hybrid score
interval for paired proportions (Newcombe 1998, "Improved confidence intervals for the difference between
binomial proportions based on paired data", method 10), which uses the Wilson intervals of both accuracies
and the correlation of the pairs.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["Z95", "wilson_interval", "accuracy_interval", "paired_difference_interval"]

Z95 = 1.959963984540054
"""The two-sided 95% quantile of the standard normal."""


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``; ``(nan, nan)`` for ``n = 0``.

    >>> lo, hi = wilson_interval(0, 10)
    >>> (round(lo, 4), round(hi, 4))
    (0.0, 0.2775)
    """
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"Expected 0 <= successes <= n, got {successes} of {n}")
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(correct: Tensor, z: float = Z95) -> tuple[float, float]:
    """Wilson interval of the accuracy of per-sample correctness ``correct`` (bool or 0/1)."""
    return wilson_interval(int(correct.bool().sum()), correct.numel(), z)


def paired_difference_interval(a: Tensor, b: Tensor, z: float = Z95) -> tuple[float, float, float]:
    """``(acc(a) - acc(b), lower, upper)``: Newcombe's interval for the difference of two paired accuracies.

    Args:
        a, b: per-sample correctness of two predictors on the same samples (same shape).
        z: normal quantile of the interval (1.96: 95%).
    """
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"Expected two non-empty correctness vectors of one shape, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    a, b = a.bool().flatten(), b.bool().flatten()
    n = a.numel()
    n11, n10 = int((a & b).sum()), int((a & ~b).sum())
    n01, n00 = int((~a & b).sum()), int((~a & ~b).sum())
    p1, p2 = (n11 + n10) / n, (n11 + n01) / n
    l1, u1 = wilson_interval(n11 + n10, n, z)
    l2, u2 = wilson_interval(n11 + n01, n, z)
    product = (n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)
    phi = (n11 * n00 - n10 * n01) / math.sqrt(product) if product > 0 else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    epsilon = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    d = p1 - p2
    return d, max(-1.0, d - delta), min(1.0, d + epsilon)
