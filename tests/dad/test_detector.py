"""The batch-level MMD detector: scores read off cached grams equal direct scores, and calibration on a
finite clean pool gives the target false-positive rate on fresh batches of the population."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

from dad.detector import DetectorNotCalibratedError, MMDDetector, finite_pool_factor
from dad.kernels import SemanticKernel
from dad.mmd import mmd2_unbiased_unpaired

SHAPE = (1, 4, 4)


def _population(n: int, generator: torch.Generator) -> Tensor:
    """Clean images: i.i.d. uniform pixels (phi is the identity on the flattened image)."""
    return torch.rand(n, *SHAPE, generator=generator)


def _detector(reference_size: int = 30, sigma_q: float = 4.0) -> MMDDetector:
    kernel = SemanticKernel(nn.Flatten(), sigma_phi=2.0, sigma_q=sigma_q, eps=0.1)
    return MMDDetector(kernel, _population(reference_size, torch.Generator().manual_seed(0)))


def test_score_is_the_unpaired_unbiased_mmd_against_the_reference() -> None:
    detector = _detector()
    x = _population(6, torch.Generator().manual_seed(1))
    expected = mmd2_unbiased_unpaired(*detector.kernel.gram(x, detector.reference))
    torch.testing.assert_close(detector.score(x), expected, rtol=1e-5, atol=1e-7)


def test_batch_scorer_equals_direct_scores() -> None:
    detector = _detector()
    pool = _population(40, torch.Generator().manual_seed(1))
    scores = detector.batch_scorer(pool)(7, 25, torch.Generator().manual_seed(2))
    order = torch.rand(25, 40, generator=torch.Generator().manual_seed(2)).argsort(1)[:, :7]
    direct = torch.stack([detector.score(pool[idx]) for idx in order])
    torch.testing.assert_close(scores, direct, rtol=1e-5, atol=1e-6)


def test_batch_scorer_draws_without_replacement_and_rejects_oversized_batches() -> None:
    detector = _detector()
    pool = _population(5, torch.Generator().manual_seed(1))
    scorer = detector.batch_scorer(pool)
    # a batch of the whole pool is the pool itself, whatever the order
    torch.testing.assert_close(scorer(5, 3), detector.score(pool).expand(3), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"batch size in \[2, 5\]"):
        scorer(6, 1)


def _fresh_scores(detector: MMDDetector, batch_size: int, num_batches: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.stack([detector.score(_population(batch_size, g)) for _ in range(num_batches)])


def test_calibration_on_a_finite_pool_gives_the_target_fpr_on_fresh_batches() -> None:
    """Averaged over calibration pools, fresh clean batches exceed the threshold at the target rate.

    Pools of 100 and batches of 20 make the finite-pool correction large (x1.22); the uncorrected
    quantile of the pool's own draws is shown to overshoot the target, so the check can fail. One pool's
    realised rate varies a lot (standard deviation 0.04 here): a deployment calibrates on a large pool.
    """
    b, target = 20, 0.05
    detector = _detector()
    fresh = _fresh_scores(detector, b, 3000, seed=100)
    corrected, uncorrected = [], []
    for pool_seed in range(40):
        pool = _population(100, torch.Generator().manual_seed(1000 + pool_seed))
        result = detector.calibrate(pool, [b], num_batches=2000, target_fpr=target,
                                    generator=torch.Generator().manual_seed(pool_seed))[b]
        assert result["spread_factor"] == pytest.approx(finite_pool_factor(100, b))
        corrected.append((fresh > detector.threshold_for(b)).float().mean())
        draws = detector.batch_scorer(pool)(b, 2000, torch.Generator().manual_seed(pool_seed))
        naive = torch.quantile(draws, 1 - target)
        uncorrected.append((fresh > naive).float().mean())
    corrected_fpr, uncorrected_fpr = torch.stack(corrected).mean().item(), torch.stack(uncorrected).mean().item()
    # measured: 0.043 (standard error 0.005 over the pools) and 0.072 (paired difference 0.029, s.e. 0.002)
    assert abs(corrected_fpr - target) < 0.015
    assert uncorrected_fpr > target + 0.015 and uncorrected_fpr - corrected_fpr > 0.015


def test_finite_pool_factor_matches_simulated_means() -> None:
    """The factor is the ratio of the spreads of fresh-batch vs in-pool-batch means around the pool mean."""
    g = torch.Generator().manual_seed(0)
    n, b, reps = 50, 10, 4000
    pools = torch.randn(reps, n, generator=g)
    in_pool = pools[:, :b].mean(1) - pools.mean(1)  # a pool's first b values: a random batch of it
    fresh = torch.randn(reps, b, generator=g).mean(1) - pools.mean(1)
    assert (fresh.std() / in_pool.std()).item() == pytest.approx(finite_pool_factor(n, b), rel=0.05)
    with pytest.raises(ValueError, match="must be larger than the batch size"):
        finite_pool_factor(10, 10)


def test_thresholds_per_batch_size_nearest_fallback_and_round_trip(caplog: pytest.LogCaptureFixture) -> None:
    detector = _detector()
    with pytest.raises(DetectorNotCalibratedError):
        detector.threshold_for(10)
    pool = _population(200, torch.Generator().manual_seed(3))
    results = detector.calibrate(pool, [10, 50], num_batches=500, generator=torch.Generator().manual_seed(0))
    assert set(results) == {10, 50} and results[10]["threshold"] > results[50]["threshold"]  # smaller: noisier
    with caplog.at_level(logging.WARNING, logger="dad.detector"):
        assert detector.threshold_for(45) == detector.threshold_for(50)
    assert "No threshold calibrated for batch size 45" in caplog.text

    restored = _detector(sigma_q=50.0)  # another kernel: the cached reference gram must follow the loaded one
    restored.load_state_dict(detector.state_dict())
    assert restored.batch_sizes.tolist() == [10, 50]
    torch.testing.assert_close(restored.thresholds, detector.thresholds)
    x = pool[:10]
    torch.testing.assert_close(restored.score(x), detector.score(x))
    assert "ref_gram" not in detector.state_dict()


def test_calibrate_rejects_batches_the_pool_cannot_supply() -> None:
    detector = _detector()
    pool = _population(20, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"batch sizes in \[2, 20\)"):
        detector.calibrate(pool, [20])
    with pytest.raises(ValueError, match="target_fpr"):
        detector.calibrate(pool, [5], target_fpr=1.0)
