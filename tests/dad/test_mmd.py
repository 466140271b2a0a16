"""MMD statistics against brute-force per-pair loops in float64."""

import itertools
import math

import pytest
import torch
from torchmetrics.image.kid import maximum_mean_discrepancy

from dad.kernels import semantic_gram
from dad.mmd import (
    fixed_rows,
    j_statistic,
    mmd2_biased,
    mmd2_unbiased,
    mmd2_unbiased_unpaired,
    mmd2_variance,
    pairwise_sq_dists,
    permutation_test,
    sq_dists_to_fixed,
)


def _gauss(x: torch.Tensor, y: torch.Tensor, s: float = 4.0) -> torch.Tensor:
    return torch.exp(-((x - y) ** 2).sum() / s)


def _brute_grams(x, y, k=_gauss):
    n, m = len(x), len(y)
    kxx = torch.tensor([[k(x[i], x[j]) for j in range(n)] for i in range(n)], dtype=torch.float64)
    kyy = torch.tensor([[k(y[i], y[j]) for j in range(m)] for i in range(m)], dtype=torch.float64)
    kxy = torch.tensor([[k(x[i], y[j]) for j in range(m)] for i in range(n)], dtype=torch.float64)
    return kxx, kyy, kxy


@pytest.fixture
def paired():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 2, 3, generator=g, dtype=torch.float64) * 1.3 + 0.4
    return x, y


def test_pairwise_sq_dists_matches_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) + 100.0
    y = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) + 100.0
    d = pairwise_sq_dists(x, y)
    ref = torch.tensor([[((x[i] - y[j]) ** 2).sum().item() for j in range(6)] for i in range(5)], dtype=torch.float64)
    assert d.shape == (5, 6)
    torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-8)


def test_distances_to_a_prepared_set_match_the_loop_and_need_equal_sizes():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) + 100.0
    y = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) + 100.0
    ref = torch.tensor([[((x[i] - y[j]) ** 2).sum().item() for j in range(6)] for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(sq_dists_to_fixed(x, fixed_rows(y)), ref, rtol=1e-10, atol=1e-8)
    near = torch.full((3, 64), 1e4) + torch.arange(3.0)[:, None]  # float32 far from the origin, near the set
    far_ref = ((torch.arange(3.0)[:, None] - torch.arange(3.0)[None]) ** 2) * 64
    torch.testing.assert_close(sq_dists_to_fixed(near, fixed_rows(near)), far_ref, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="48 features"):
        sq_dists_to_fixed(torch.zeros(2, 5), fixed_rows(y))


def test_pairwise_sq_dists_float32_far_from_origin_is_accurate():
    x = torch.full((3, 64), 1e4) + torch.arange(3.0)[:, None]
    d = pairwise_sq_dists(x, x)
    ref = ((torch.arange(3.0)[:, None] - torch.arange(3.0)[None]) ** 2) * 64
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-3)


def test_mmd2_unbiased_matches_loop(paired):
    x, y = paired
    kxx, kyy, kxy = _brute_grams(x, y)
    n = len(x)
    total = 0.0
    for i, j in itertools.permutations(range(n), 2):
        total += (_gauss(x[i], x[j]) + _gauss(y[i], y[j]) - _gauss(x[i], y[j]) - _gauss(x[j], y[i])).item()
    assert mmd2_unbiased(kxx, kyy, kxy).item() == pytest.approx(total / (n * (n - 1)), rel=1e-12)


def test_mmd2_unpaired_matches_torchmetrics_and_loop():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64) + 0.5
    kxx, kyy, kxy = _brute_grams(x, y)
    xx = sum(_gauss(x[i], x[j]).item() for i, j in itertools.permutations(range(5), 2)) / 20
    yy = sum(_gauss(y[i], y[j]).item() for i, j in itertools.permutations(range(8), 2)) / 56
    xy = sum(_gauss(x[i], y[j]).item() for i in range(5) for j in range(8)) / 40
    assert mmd2_unbiased_unpaired(kxx, kyy, kxy).item() == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    # torchmetrics' KID estimator (equal sizes, diagonal of kxy kept) is an independent reference
    x2, y2 = x[:5], y[:5]
    grams = _brute_grams(x2, y2)
    ref = maximum_mean_discrepancy(grams[0], grams[2], grams[1])
    assert mmd2_unbiased_unpaired(*grams).item() == pytest.approx(ref.item(), rel=1e-10)


def test_mmd2_biased_matches_loop(paired):
    x, y = paired
    kxx, kyy, kxy = _brute_grams(x, y)
    n = len(x)
    total = sum(
        (_gauss(x[i], x[j]) + _gauss(y[i], y[j]) - 2 * _gauss(x[i], y[j])).item() for i in range(n) for j in range(n)
    )
    assert mmd2_biased(kxx, kyy, kxy).item() == pytest.approx(total / n**2, rel=1e-12)


def test_variance_and_j_match_loop(paired):
    x, y = paired
    kxx, kyy, kxy = _brute_grams(x, y)
    n = len(x)
    h = [[(kxx[i, j] + kyy[i, j] - kxy[i, j] - kxy[j, i]).item() for j in range(n)] for i in range(n)]
    row = [sum(r) / n for r in h]
    mean_all = sum(row) / n
    var = 4 * (sum(r * r for r in row) / n - mean_all**2)
    assert mmd2_variance(kxx, kyy, kxy).item() == pytest.approx(var, rel=1e-10)
    mmd = mmd2_unbiased(kxx, kyy, kxy).item()
    assert j_statistic(kxx, kyy, kxy).item() == pytest.approx(mmd / math.sqrt(var + 1e-8), rel=1e-10)


def test_semantic_gram_matches_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 3, 3, generator=g, dtype=torch.float64)
    y = torch.rand(3, 1, 3, 3, generator=g, dtype=torch.float64)
    fx, fy = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    sp, sq, eps = 2.5, 7.0, 0.1
    k = semantic_gram(fx, fy, x, y, sp, sq, eps)
    for i in range(4):
        for j in range(3):
            dq = ((x[i] - y[j]) ** 2).sum()
            dp = ((fx[i] - fy[j]) ** 2).sum()
            ref = (1 - eps) * torch.exp(-dp / sp - dq / sq) + eps * torch.exp(-dq / sq)
            assert k[i, j].item() == pytest.approx(ref.item(), rel=1e-12)
    k_t = semantic_gram(fx, fy, x, y, torch.tensor(sp), torch.tensor(sq), torch.tensor(eps))
    torch.testing.assert_close(k, k_t.to(k))


@pytest.mark.parametrize("case", ["identical", "huge", "n2"])
def test_statistics_finite_in_float32(case):
    g = torch.Generator().manual_seed(4)
    if case == "identical":
        x = torch.rand(6, 10, generator=g)
        y = x.clone()
    elif case == "huge":
        x = torch.rand(6, 10, generator=g) * 1e6
        y = -x
    else:
        x, y = torch.rand(2, 10, generator=g), torch.rand(2, 10, generator=g)
    x.requires_grad_(True)
    fx, fy = x * 2, y * 2
    grams = (
        semantic_gram(fx, fx, x, x, 1.0, 1.0, 0.1),
        semantic_gram(fy, fy, y, y, 1.0, 1.0, 0.1),
        semantic_gram(fx, fy, x, y, 1.0, 1.0, 0.1),
    )
    for fn in (mmd2_unbiased, mmd2_biased, mmd2_variance, j_statistic):
        out = fn(*grams)
        assert torch.isfinite(out), fn.__name__
    (grad,) = torch.autograd.grad(j_statistic(*grams), x)
    assert torch.isfinite(grad).all()
    if case == "identical":
        assert j_statistic(*grams).abs().item() < 1e-3


def test_size_validation():
    k = torch.eye(3)
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_unbiased(torch.eye(1), torch.eye(1), torch.eye(1))
    with pytest.raises(ValueError, match="square gram"):
        mmd2_unbiased(k, torch.eye(4), k)
    with pytest.raises(ValueError, match="equal size"):
        pairwise_sq_dists(torch.zeros(2, 3), torch.zeros(2, 4))


def test_permutation_test_is_calibrated_and_powerful():
    g = torch.Generator().manual_seed(5)

    def grams(x, y):
        return tuple(torch.exp(-pairwise_sq_dists(a, b) / 4.0) for a, b in ((x, x), (y, y), (x, y)))

    same = [permutation_test(*grams(torch.randn(20, 2, generator=g), torch.randn(20, 2, generator=g)), 200, g)[1]
            for _ in range(40)]
    rejections = sum(p.item() <= 0.05 for p in same)
    assert rejections <= 6  # expected 2 of 40 under the null; 6 is far in the binomial tail
    stat, p = permutation_test(*grams(torch.randn(20, 2, generator=g), torch.randn(20, 2, generator=g) + 1.5), 200, g)
    assert p.item() <= 1 / 201 + 1e-9
    assert stat.item() > 0


def test_permutation_null_matches_explicit_relabelling():
    """The vectorised null statistic equals recomputing the estimator on each permuted sample."""
    from dad.mmd import _unpaired_stats_from_masks

    g = torch.Generator().manual_seed(6)
    z = torch.randn(9, 3, generator=g, dtype=torch.float64)
    k = torch.exp(-pairwise_sq_dists(z, z) / 3.0)
    perm = torch.randperm(9, generator=g)
    xi, yi = perm[:4], perm[4:]
    mask = torch.zeros(1, 9, dtype=torch.float64)
    mask[0, xi] = 1.0
    ref = mmd2_unbiased_unpaired(k[xi][:, xi], k[yi][:, yi], k[xi][:, yi])
    assert _unpaired_stats_from_masks(k, mask).item() == pytest.approx(ref.item(), rel=1e-12)
