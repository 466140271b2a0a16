"""Sanity checks on toy models whose answer is known (a linear model passes, gradient masking is flagged),
and the evaluation metrics against brute-force definitions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks import pgd
from dad.attacks.common import margin
from dad.defense import DefenseOutput
from dad.metrics import auroc, even_splits, mixed_batch_rates, rate_above, roc_curve, worst_case
from dad.sanity import (
    RobustFn, attack_checks, attack_variants, check_at_least_as_strong, check_gradients, check_near_chance,
    check_non_increasing, check_randomness, check_unchanged, paired_tolerance,
)

EPS = 0.2


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1200]], y[perm[:1200]], x[perm[1200:1300]], y[perm[1200:1300]]


@pytest.fixture(scope="module")
def linear(digits: tuple[Tensor, ...]) -> nn.Module:
    x, y = digits[:2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


class _Quantized(nn.Module):
    """Gradient masking: the input is rounded to 4 levels first (zero gradient almost everywhere)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(torch.round(x * 4) / 4)


class _Detached(nn.Module):
    """Gradient masking: the input is detached from the graph."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.detach())


class _Noisy(nn.Module):
    """A randomised model: Gaussian noise on the input."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x + 0.05 * torch.randn_like(x))


def _robust_fn(model: nn.Module, x: Tensor, y: Tensor, random_start: bool = True) -> RobustFn:
    def robust(eps_factor: float, steps_factor: int, eot_factor: int, seed_offset: int) -> Tensor:
        torch.manual_seed(seed_offset)
        eps = EPS * eps_factor
        x_adv = pgd(model, x, y, eps, eps / 8, 20 * steps_factor, random_start=random_start, eot_samples=eot_factor)
        with torch.no_grad():
            return model(x_adv).argmax(1) == y

    return robust


def _margin_loss(model: nn.Module, y: Tensor):  # type: ignore[no-untyped-def]
    return lambda x: margin(model(x), y)


def test_linear_model_passes_every_check(linear: nn.Module, digits: tuple[Tensor, ...]) -> None:
    x, y = digits[2:]
    with torch.no_grad():
        assert (linear(x).argmax(1) == y).float().mean() > 0.9
    checks, sweep = attack_checks(_robust_fn(linear, x, y), 10, EPS, (0.25, 0.5, 1.0, 2.5), randomized=False)
    checks["gradients"] = check_gradients(_margin_loss(linear, y), [x])
    checks["randomness"] = check_randomness(linear, [x], {"pgd": 1})
    failed = {k: c.detail for k, c in checks.items() if not c.passed}
    assert not failed, failed
    assert sorted(sweep) == [0.25, 0.5, 1.0, 2.5]


def test_quantized_model_is_flagged(linear: nn.Module, digits: tuple[Tensor, ...]) -> None:
    x, y = digits[2:]
    masked = _Quantized(linear)
    checks, _ = attack_checks(_robust_fn(masked, x, y, random_start=False), 10, EPS, (0.5, 1.0, 2.5),
                              randomized=False)
    assert not checks["large_eps_near_chance"].passed
    gradients = check_gradients(_margin_loss(masked, y), [x])
    assert not gradients.passed and "non-zero for 0% of samples" in gradients.detail


def test_detached_model_is_flagged(linear: nn.Module, digits: tuple[Tensor, ...]) -> None:
    x, y = digits[2:]
    assert not check_gradients(_margin_loss(_Detached(linear), y), [x]).passed


def test_non_finite_gradients_are_flagged(digits: tuple[Tensor, ...]) -> None:
    x = digits[2]
    result = check_gradients(lambda z: (z - z.detach()).sqrt().flatten(1).sum(1), [x])  # d sqrt(u)/du at 0: inf
    assert not result.passed and "NON-FINITE" in result.detail


def test_randomness_requires_eot(linear: nn.Module, digits: tuple[Tensor, ...]) -> None:
    x = digits[2]
    noisy = _Noisy(linear)
    without = check_randomness(noisy, [x], {"adaptive": 5, "evade": 1})
    assert not without.passed and "evade" in without.detail
    assert check_randomness(noisy, [x], {"adaptive": 5}).passed
    assert not check_randomness(noisy, [x], {}).passed
    assert check_randomness(linear, [x], {"pgd": 1}).passed


def test_paired_tolerance_is_mcnemar() -> None:
    a = torch.tensor([True] * 6 + [False] * 4)
    b = torch.tensor([True] * 2 + [False] * 8)  # 4 discordant pairs of 10
    assert paired_tolerance(a, b, z=2.0) == pytest.approx(2.0 * math.sqrt(4) / 10 + 0.1)
    with pytest.raises(ValueError, match="one shape"):
        paired_tolerance(a, b[:5])


def test_comparison_checks() -> None:
    n = 200
    high, low = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    assert check_non_increasing([0.1, 0.2], [high, low]).passed
    rising = check_non_increasing([0.2, 0.1, 0.3], [high, low, high])  # eps order: 0.1 low, 0.2 high
    assert not rising.passed and "0.1->0.2" in rising.detail
    assert "NOT converged" in check_unchanged("2x steps", high, low).detail
    assert "WEAKER" in check_unchanged("2x steps", low, high).detail
    assert check_unchanged("2x steps", high, high).passed
    assert check_at_least_as_strong("wb", low, high).passed and not check_at_least_as_strong("wb", high, low).passed
    assert check_near_chance(low, 10).passed and not check_near_chance(high, 10).passed


def test_attack_variants_match_the_calls(linear: nn.Module, digits: tuple[Tensor, ...]) -> None:
    x, y = digits[2:]
    calls: list[tuple[float, int, int, int]] = []
    inner = _robust_fn(linear, x[:20], y[:20])

    def robust(*run: float) -> Tensor:
        calls.append(run)  # type: ignore[arg-type]
        return inner(*run)  # type: ignore[arg-type]

    attack_checks(robust, 10, EPS, (0.5, 2.0), randomized=True)
    assert calls == attack_variants((0.5, 2.0), randomized=True)


def _brute_auroc(neg: Tensor, pos: Tensor) -> float:
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for n, p in itertools.product(neg.tolist(), pos.tolist())]
    return sum(pairs) / len(pairs)


def test_auroc_matches_pairwise_definition_even_for_tiny_scores() -> None:
    g = torch.Generator().manual_seed(0)
    neg, pos = torch.randn(40, generator=g), torch.randn(30, generator=g) + 0.8
    assert auroc(neg, pos) == pytest.approx(_brute_auroc(neg, pos), abs=1e-6)
    tiny_neg, tiny_pos = 1e-7 * torch.arange(10.0), 1e-7 * (torch.arange(10.0) + 5.5)  # a sigmoid would tie these
    assert auroc(tiny_neg, tiny_pos) == pytest.approx(_brute_auroc(tiny_neg, tiny_pos))
    fpr, tpr = roc_curve(neg, pos)
    assert fpr[0] == 0 and tpr[-1] == 1 and (fpr.diff() >= 0).all()


def test_rates_worst_case_and_splits() -> None:
    assert rate_above(torch.tensor([0.1, 0.5, 0.9, 0.5]), 0.5) == 0.25
    a, b = torch.tensor([True, True, False]), torch.tensor([True, False, True])
    assert worst_case([a, b]).tolist() == [True, False, False]
    assert even_splits(7, 3) == [(0, 3), (3, 7)]  # a one-image batch joins the previous one
    assert even_splits(6, 3) == [(0, 3), (3, 6)]


class _ToyDefense(nn.Module):
    """Predicts class 1 for bright images (AEs), 0 for dark ones; flags a batch with >= 25% bright images."""

    def forward_with_info(self, x: Tensor) -> DefenseOutput:
        bright = x.flatten(1).mean(1) > 0.5
        logits = F.one_hot(bright.long(), 2).float()
        return DefenseOutput(logits=logits, score=bright.float().mean(), adversarial=bright.float().mean() >= 0.25)


def test_mixed_batches_against_a_known_rule() -> None:
    n = 40
    clean, adv, y = torch.zeros(n, 1, 2, 2), torch.ones(n, 1, 2, 2), torch.zeros(n, dtype=torch.long)
    expected = {0.0: (0.0, None), 0.1: (0.0, 0.0), 0.5: (1.0, 0.0), 1.0: (1.0, 0.0)}
    for fraction, (rate, acc_adv) in expected.items():
        out = mixed_batch_rates(_ToyDefense(), clean, adv, y, fraction, 10, 5, torch.Generator().manual_seed(0))
        assert out["detection_rate"] == rate and out["acc_adv_part"] == acc_adv
        assert out["acc_clean_part"] in (1.0, None) and out["adv_per_batch"] == round(fraction * 10)
    with pytest.raises(ValueError, match="fraction"):
        mixed_batch_rates(_ToyDefense(), clean, adv, y, 1.5, 10, 1)
