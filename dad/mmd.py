"""Maximum mean discrepancy (MMD) statistics on precomputed gram matrices.

All functions take kernel (gram) matrices so that the kernel and the estimator stay independent:
``kxx = k(X, X)``, ``kyy = k(Y, Y)``, ``kxy = k(X, Y)``. The paired estimators (``mmd2_unbiased``,
``mmd2_variance``, ``j_statistic``) follow Liu et al. 2020, "Learning Deep Kernels for Non-Parametric
Two-Sample Tests": sample ``i`` of X is paired with sample ``i`` of Y (a clean image and its
adversarial example), so all three matrices are square of the same size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "pairwise_sq_dists",
    "FixedRows",
    "fixed_rows",
    "sq_dists_to_fixed",
    "mmd2_unbiased",
    "mmd2_unbiased_unpaired",
    "mmd2_biased",
    "mmd2_variance",
    "j_statistic",
    "permutation_test",
]


def pairwise_sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distances between every row of ``x`` and every row of ``y``.

    Inputs of any shape ``(n, ...)`` are flattened per sample. Both sets are centred on a common
    point first, which removes most of the cancellation in ``|x|^2 + |y|^2 - 2 x.y`` for data far from
    the origin; the result is clamped at zero so rounding never yields a negative distance (and the
    gradient stays finite, unlike ``cdist(...) ** 2`` at zero distance).

    Args:
        x: tensor of shape ``(n, ...)``.
        y: tensor of shape ``(m, ...)`` with the same number of elements per sample as ``x``.

    Returns:
        Tensor of shape ``(n, m)``.

    Raises:
        ValueError: for non-floating-point inputs or samples of different sizes.
    """
    if not (x.is_floating_point() and y.is_floating_point()):
        raise ValueError(f"Expected floating-point samples, got {x.dtype} and {y.dtype}")
    x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    y = y.reshape(y.shape[0], math.prod(y.shape[1:]))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"Expected samples of equal size, got {x.shape[1]} and {y.shape[1]} features")
    centre = torch.cat([x, y]).mean(0, keepdim=True).detach()
    x = x - centre
    y = y - centre
    x_sq = (x * x).sum(1, keepdim=True)
    y_sq = (y * y).sum(1, keepdim=True)
    return (x_sq + y_sq.T - 2.0 * (x @ y.T)).clamp_min(0.0)


class FixedRows(NamedTuple):
    """A set queried again and again (stored images): flattened, centred on its mean, with squared norms."""

    centre: Tensor
    rows: Tensor
    sq_norms: Tensor


def fixed_rows(y: Tensor) -> FixedRows:
    """Prepare ``y`` ``(m, ...)`` for :func:`sq_dists_to_fixed` (no gradient: the set is a constant)."""
    y = y.detach().reshape(y.shape[0], math.prod(y.shape[1:]))
    centre = y.mean(0, keepdim=True)
    rows = y - centre
    return FixedRows(centre, rows, (rows * rows).sum(1))


def sq_dists_to_fixed(x: Tensor, fixed: FixedRows) -> Tensor:
    """:func:`pairwise_sq_dists` of ``x`` to a prepared set: one matrix product per query.

    The set's own centring, norms and copy are paid once in :func:`fixed_rows`; centring on the set's mean
    serves the precision as well as :func:`pairwise_sq_dists`'s common centre when ``x`` is drawn near the set.
    """
    x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    if x.shape[1] != fixed.rows.shape[1]:
        raise ValueError(f"Expected samples of {fixed.rows.shape[1]} features, got {x.shape[1]}")
    x = x - fixed.centre
    return ((x * x).sum(1, keepdim=True) + fixed.sq_norms - 2.0 * (x @ fixed.rows.T)).clamp_min(0.0)


def _check_paired(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> int:
    n = kxx.shape[0]
    for name, k in (("kxx", kxx), ("kyy", kyy), ("kxy", kxy)):
        if k.dim() != 2 or k.shape != (n, n):
            raise ValueError(
                f"Expected square gram matrices of one size for the paired MMD, got {name} {tuple(k.shape)}")
    if n < 2:
        raise ValueError(f"The unbiased MMD needs at least 2 samples per set, got {n}")
    return n


def _off_diagonal_sum(k: Tensor) -> Tensor:
    return k.sum() - k.diagonal().sum()


def mmd2_unbiased(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> Tensor:
    """Paired unbiased estimate (U-statistic) of MMD^2.

    ``(sum_{i!=j} Kxx + sum_{i!=j} Kyy - 2 sum_{i!=j} Kxy) / (n (n - 1))``: the diagonal is left out of
    all three sums, which makes the estimate unbiased for paired samples.
    """
    n = _check_paired(kxx, kyy, kxy)
    total = _off_diagonal_sum(kxx) + _off_diagonal_sum(kyy) - 2.0 * _off_diagonal_sum(kxy)
    return total / (n * (n - 1))


def mmd2_unbiased_unpaired(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> Tensor:
    """Unbiased estimate of MMD^2 for two independent samples of sizes ``n`` and ``m``.

    The within-sample sums leave out the diagonal; the cross term keeps every pair. This is the
    estimator for a test batch against a reference set of another size (the detector's score).
    """
    n, m = kxx.shape[0], kyy.shape[0]
    if kxx.shape != (n, n) or kyy.shape != (m, m) or kxy.shape != (n, m):
        raise ValueError(
            f"Expected gram matrices (n,n), (m,m), (n,m), got {tuple(kxx.shape)}, {tuple(kyy.shape)}, "
            f"{tuple(kxy.shape)}"
        )
    if n < 2 or m < 2:
        raise ValueError(f"The unbiased MMD needs at least 2 samples per set, got {n} and {m}")
    return (
        _off_diagonal_sum(kxx) / (n * (n - 1))
        + _off_diagonal_sum(kyy) / (m * (m - 1))
        - 2.0 * kxy.mean()
    )


def mmd2_biased(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> Tensor:
    """Biased estimate (V-statistic) of MMD^2: ``mean(Kxx) + mean(Kyy) - 2 mean(Kxy)``.

    Always non-negative for a positive-definite kernel; the published DAD code trains the denoiser
    with it. Sizes may differ.
    """
    return kxx.mean() + kyy.mean() - 2.0 * kxy.mean()


def mmd2_variance(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> Tensor:
    """Variance estimate of the paired unbiased MMD^2 (Liu et al. 2020).

    ``4 (mean_i (mean_j H_ij)^2 - (mean_ij H_ij)^2)`` with ``H = Kxx + Kyy - Kxy - Kxy^T``.
    """
    _check_paired(kxx, kyy, kxy)
    h = kxx + kyy - kxy - kxy.T
    row_means = h.mean(1)
    return 4.0 * ((row_means * row_means).mean() - h.mean() ** 2)


def j_statistic(kxx: Tensor, kyy: Tensor, kxy: Tensor, reg: float = 1e-8) -> Tensor:
    """Test-power proxy ``J = MMD^2_u / sqrt(var + reg)``, the objective MMD-OPT maximises.

    ``reg`` keeps J finite when the variance estimate is zero (identical samples); the variance is
    also clamped at zero, since rounding can push the estimate slightly negative.
    """
    if reg <= 0:
        raise ValueError(f"Expected `reg` > 0, got {reg}")
    return mmd2_unbiased(kxx, kyy, kxy) / torch.sqrt(mmd2_variance(kxx, kyy, kxy).clamp_min(0.0) + reg)


def _unpaired_stats_from_masks(k: Tensor, masks: Tensor) -> Tensor:
    """Unpaired unbiased MMD^2 for each row of the boolean-as-float ``masks`` (P, N) over gram ``k`` (N, N)."""
    k_off = k - torch.diag_embed(k.diagonal())
    inv = 1.0 - masks
    n = masks.sum(1)
    m = inv.sum(1)
    sxx = ((masks @ k_off) * masks).sum(1)
    syy = ((inv @ k_off) * inv).sum(1)
    sxy = ((masks @ k) * inv).sum(1)
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m)


def permutation_test(
    kxx: Tensor,
    kyy: Tensor,
    kxy: Tensor,
    num_permutations: int = 500,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Permutation test of ``H0: P_X = P_Y`` with the unpaired unbiased MMD^2 as the statistic.

    The pooled gram matrix is permuted by relabelling its rows: every permutation is an indicator
    vector of "belongs to X", and all of them are evaluated with two batched matrix products (no
    Python loop per permutation).

    Args:
        kxx, kyy, kxy: gram matrices of shapes (n, n), (m, m), (n, m).
        num_permutations: number of random relabellings.
        generator: optional random generator (on the grams' device) for reproducible p-values.

    Returns:
        ``(statistic, p_value)`` where the p-value is ``(1 + #{perm >= stat}) / (1 + num_permutations)``.
    """
    if num_permutations < 1:
        raise ValueError(f"Expected `num_permutations` >= 1, got {num_permutations}")
    statistic = mmd2_unbiased_unpaired(kxx, kyy, kxy)
    n, m = kxx.shape[0], kyy.shape[0]
    k = torch.cat([torch.cat([kxx, kxy], 1), torch.cat([kxy.T, kyy], 1)], 0).detach()
    order = torch.rand(num_permutations, n + m, generator=generator, device=k.device).argsort(1)
    masks = (order < n).to(k)
    null = _unpaired_stats_from_masks(k, masks)
    p_value = (1.0 + (null >= statistic.detach()).sum()) / (1.0 + num_permutations)
    return statistic, p_value
