"""Intervals against known values and by simulated coverage."""

from __future__ import annotations

import math

import pytest
import torch

from dad.stats import paired_difference_interval, wilson_interval


def test_wilson_matches_the_closed_form_and_known_values() -> None:
    lo, hi = wilson_interval(81, 263)  # Newcombe (1998a), example: 0.2553 to 0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_paired_interval_properties() -> None:
    a = torch.tensor([1] * 12 + [1] * 5 + [0] * 2 + [0] * 21)
    b = torch.tensor([1] * 12 + [0] * 5 + [1] * 2 + [0] * 21)
    d, lo, hi = paired_difference_interval(a, b)
    assert d == pytest.approx(3 / 40) and lo < d < hi and lo < 0 < hi  # 5 vs 2 discordant pairs: not significant
    nd, nlo, nhi = paired_difference_interval(b, a)
    assert (nd, nlo, nhi) == pytest.approx((-d, -hi, -lo))  # swapping the two mirrors the interval
    better = torch.cat([torch.ones(60), torch.zeros(40)])
    worse = torch.cat([torch.zeros(30), torch.ones(30), torch.zeros(40)])
    assert paired_difference_interval(better, worse)[1] > 0  # 30 discordant pairs one way: excludes 0
    _, slo, shi = paired_difference_interval(a, a)
    assert slo <= 0 <= shi and shi - slo < 0.03  # Newcombe's interval is not degenerate for identical pairs


def test_intervals_cover_the_truth_about_95_percent_of_the_time() -> None:
    g = torch.Generator().manual_seed(0)
    n, trials, p_a, p_b = 200, 1500, 0.85, 0.8
    cover_wilson = cover_paired = 0
    true_b = _probability(p_b)
    for _ in range(trials):
        shared = torch.rand(n, generator=g)  # correlated pairs, as two defenses on the same samples are
        a = shared < p_a
        b = (0.7 * shared + 0.3 * torch.rand(n, generator=g)) < p_b
        lo, hi = wilson_interval(int(a.sum()), n)
        cover_wilson += lo <= p_a <= hi
        _, dlo, dhi = paired_difference_interval(a, b)
        cover_paired += dlo <= p_a - true_b <= dhi
    assert 0.93 <= cover_wilson / trials <= 0.97
    assert 0.93 <= cover_paired / trials <= 0.975


def _probability(threshold: float, samples: int = 2_000_000) -> float:
    """P(0.7 U + 0.3 V < threshold) for independent uniforms, by Monte Carlo (the paired test's second rate)."""
    g = torch.Generator().manual_seed(1)
    mixed = 0.7 * torch.rand(samples, generator=g) + 0.3 * torch.rand(samples, generator=g)
    return (mixed < threshold).double().mean().item()
