"""Per-sample scores against their brute-force definitions, calibration on fresh draws, and the routing modes."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dad.defense import DADDefense
from dad.detector import MMDDetector
from dad.kernels import SemanticKernel
from dad.purification import DenoiserPurifier
from dad.routing import BothRouter
from dad.sample_detector import SampleDetector, quantile_interval


class _Flatten(nn.Module):
    """phi: the first 4 pixels as features (cheap and exactly known)."""

    def forward_features(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :4]


def _kernel() -> SemanticKernel:
    return SemanticKernel(_Flatten(), sigma_phi=0.5, sigma_q=4.0, eps=0.1).double()


def _k(a: Tensor, b: Tensor, kernel: SemanticKernel) -> float:
    fa, fb = a.flatten()[:4], b.flatten()[:4]
    d_phi = ((fa - fb) ** 2).sum() / kernel.sigma_phi
    d_q = ((a - b) ** 2).sum() / kernel.sigma_q
    return ((1 - kernel.eps) * torch.exp(-d_phi - d_q) + kernel.eps * torch.exp(-d_q)).item()


@pytest.mark.parametrize("kind", ["witness", "reference"])
def test_scores_equal_their_brute_force_definition(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(7, 1, 3, 3, generator=g, dtype=torch.float64)
    adversarial = torch.rand(5, 1, 3, 3, generator=g, dtype=torch.float64)
    x = torch.rand(4, 1, 3, 3, generator=g, dtype=torch.float64)
    kernel = _kernel()
    detector = SampleDetector(kernel, clean, adversarial, kind)
    expected = []
    for xi in x:
        to_clean = sum(_k(xi, c, kernel) for c in clean) / len(clean)
        if kind == "witness":
            expected.append(sum(_k(xi, a, kernel) for a in adversarial) / len(adversarial) - to_clean)
        else:
            pairs = [_k(a, b, kernel) for i, a in enumerate(clean) for j, b in enumerate(clean) if i != j]
            expected.append(_k(xi, xi, kernel) - 2 * to_clean + sum(pairs) / len(pairs))
    # the kernel computes its grams in float32 (also under bf16 autocast)
    torch.testing.assert_close(detector.scores(x).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("kind", ["witness", "reference"])
def test_a_loaded_detector_scores_as_the_saved_one(kind: str) -> None:
    g = torch.Generator().manual_seed(3)
    saved = SampleDetector(_kernel(), torch.rand(9, 1, 3, 3, generator=g, dtype=torch.float64),
                           torch.rand(9, 1, 3, 3, generator=g, dtype=torch.float64), kind)
    loaded = SampleDetector(_kernel(), torch.rand(4, 1, 3, 3, dtype=torch.float64),
                            torch.rand(4, 1, 3, 3, dtype=torch.float64), kind)  # other sets, other sizes
    loaded.load_state_dict(saved.state_dict())
    x = torch.rand(5, 1, 3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(loaded.scores(x), saved.scores(x))


def test_calibration_meets_its_fpr_on_fresh_clean_draws() -> None:
    g = torch.Generator().manual_seed(1)
    clean_set = torch.rand(50, 1, 3, 3, generator=g, dtype=torch.float64) * 0.5
    adversarial = torch.rand(50, 1, 3, 3, generator=g, dtype=torch.float64) * 0.5 + 0.5
    detector = SampleDetector(_kernel(), clean_set, adversarial)
    result = detector.calibrate(torch.rand(3000, 1, 3, 3, generator=g, dtype=torch.float64) * 0.5, target_fpr=0.05)
    assert result["threshold_low"] <= result["threshold"] <= result["threshold_high"]
    fresh = torch.rand(20000, 1, 3, 3, generator=g, dtype=torch.float64) * 0.5
    fpr = detector.decide(detector.scores(fresh)).double().mean().item()
    assert abs(fpr - 0.05) < 0.012  # binomial sd of the calibration quantile at n = 3000: 0.004
    shifted = torch.rand(2000, 1, 3, 3, generator=g, dtype=torch.float64) * 0.5 + 0.3
    assert detector.decide(detector.scores(shifted)).double().mean() > 0.5  # images towards the AEs are flagged


def test_quantile_interval_brackets_the_quantile() -> None:
    scores = torch.arange(1000, dtype=torch.float64)
    estimate, lo, hi = quantile_interval(scores, 0.95)
    assert lo < estimate < hi and 930 < lo and hi < 970


class _Spy(nn.Module):
    """A denoiser that records the batches it purifies (and is the identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(len(x))
        return x


def _defense(routing: str) -> tuple[DADDefense, _Spy]:
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(9, 3))
    classifier.forward_features = lambda x: x.flatten(1)[:, :4]  # type: ignore[attr-defined]
    kernel = SemanticKernel(_Flatten(), sigma_phi=0.5, sigma_q=4.0, eps=0.1)
    clean, adversarial = torch.rand(60, 1, 3, 3) * 0.5, torch.rand(60, 1, 3, 3) * 0.5 + 0.5
    detector = MMDDetector(kernel, clean[:30])
    sample = SampleDetector(kernel, clean, adversarial)
    pool = torch.rand(600, 1, 3, 3) * 0.5
    spy = _Spy()
    defense = DADDefense(classifier, detector, DenoiserPurifier(spy, noise_std=0.0), sample_detector=sample,
                         routing="batch")
    defense.calibrate(pool, [10], 0.05, num_batches=500, seed=0)
    defense.routing = routing
    return defense, spy


def test_sample_routing_purifies_only_the_flagged_images_and_takes_single_images() -> None:
    defense, spy = _defense("sample")
    batch = torch.rand(10, 1, 3, 3) * 0.5
    batch[3] = 0.95  # one image far towards the training AEs
    out = defense.forward_with_info(batch)
    assert out.flags[3] and out.flags.sum() <= 2 and spy.seen == [int(out.flags.sum())]
    single = defense.forward_with_info(batch[3:4])
    assert single.flags.tolist() == [True] and single.logits.shape == (1, 3)
    defense.routing = "batch"
    with pytest.raises(ValueError, match="at least 2"):
        defense(batch[:1])


def test_both_routing_purifies_about_the_target_share_of_fresh_clean_images() -> None:
    defense, _ = _defense("both")
    g = torch.Generator().manual_seed(5)
    purified = torch.cat([defense.forward_with_info(torch.rand(10, 1, 3, 3, generator=g) * 0.5).flags
                          for _ in range(600)]).double().mean().item()
    assert abs(purified - 0.05) < 0.02
    assert isinstance(defense.router, BothRouter) and defense.router.calibrated
    with pytest.raises(ValueError, match="routing"):
        defense.routing = "nope"


@pytest.mark.parametrize("routing", ["never", "always"])
def test_fixed_routings_take_one_route_whatever_the_input(routing: str) -> None:
    defense, spy = _defense(routing)
    clean, far = torch.rand(10, 1, 3, 3) * 0.5, torch.full((10, 1, 3, 3), 0.95)
    for batch in (clean, far, far[:1]):
        out = defense.forward_with_info(batch)
        assert out.flags.tolist() == [routing == "always"] * len(batch)
        expected = defense.classifier(batch) if routing == "never" else defense.classifier(spy(batch))
        torch.testing.assert_close(out.logits, expected)
    assert spy.seen == ([] if routing == "never" else [10, 10, 10, 10, 1, 1])  # the defense, then the check
    detection = defense.detect(far.requires_grad_(), defense.classify_with_features(far)[1])
    assert detection.batch_excess.item() == (1.0 if routing == "always" else -1.0)
    assert not detection.batch_excess.requires_grad and detection.sample_excess is None


def test_fixed_routings_need_no_per_sample_detector() -> None:
    defense, _ = _defense("batch")
    defense.sample_detector = None
    defense.routing = "never"
    with pytest.raises(ValueError, match="per-sample detector"):
        defense.routing = "sample"
