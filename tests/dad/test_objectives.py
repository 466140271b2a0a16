"""Objectives of attacks through the defense: the DLR loss, per-sample sums, mixed batches, whole-batch judging."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks.judging import error_rates, strongest_batch
from dad.attacks.objectives import classification_loss, defense_objective
from dad.defense import DADDefense
from dad.denoisers import UNetDenoiser
from dad.detector import MMDDetector
from dad.kernels import SemanticKernel
from dad.models import create_model
from dad.purification import DenoiserPurifier


def test_dlr_matches_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    expected = []
    for z, label in zip(logits.tolist(), y.tolist()):
        top = sorted(z, reverse=True)
        other = max(v for j, v in enumerate(z) if j != label)
        expected.append(-(z[label] - other) / (top[0] - top[2] + 1e-12))
    torch.testing.assert_close(classification_loss(logits, y, "dlr"), torch.tensor(expected))
    torch.testing.assert_close(classification_loss(3 * logits + 7, y, "dlr"), classification_loss(logits, y, "dlr"))
    torch.testing.assert_close(classification_loss(logits, y, "ce"), F.cross_entropy(logits, y, reduction="none"))


@pytest.fixture(scope="module")
def defense() -> DADDefense:
    torch.manual_seed(0)
    classifier = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    detector = MMDDetector(SemanticKernel(classifier, sigma_phi=10.0, sigma_q=128.0), torch.rand(20, 1, 8, 8))
    detector.calibrate(torch.rand(60, 1, 8, 8), [4, 10], num_batches=200, generator=torch.Generator().manual_seed(0))
    denoiser = UNetDenoiser(1, (4, 8), (1, 1), (4,), (1,)).eval()
    return DADDefense(classifier, detector, DenoiserPurifier(denoiser, noise_std=0.0))


@pytest.mark.parametrize("objective", ["adaptive", "evade_clean", "evade_denoised", "evade_soft", "evade_bpda"])
def test_objectives_on_mixed_batches_score_the_whole_batch(defense: DADDefense, objective: str) -> None:
    x, filler = torch.rand(4, 1, 8, 8), torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (4,))
    per_sample = defense_objective(defense, y, objective, lam=1.0, loss="ce", filler=filler)(x)
    assert per_sample.shape == (4,)
    with torch.no_grad():
        batch = torch.cat([x, filler])
        score = defense.detector.score(batch)  # the detector sees all 10 images
        excess = (score - defense.detector.threshold_for(10)) / defense.detector.threshold_for(10).abs()
        if objective == "evade_clean":
            expected = F.cross_entropy(defense.classifier(x), y, reduction="none").sum() - 4 * F.relu(excess + 0.1)
            torch.testing.assert_close(per_sample.sum(), expected, rtol=1e-4, atol=1e-5)
        if objective == "adaptive":
            logits = defense(batch)[:4]
            expected = F.cross_entropy(logits, y, reduction="none").sum() + 4 * score
            torch.testing.assert_close(per_sample.sum(), expected, rtol=1e-4, atol=1e-5)
    grad = torch.autograd.grad(defense_objective(defense, y, objective, 1.0, filler=filler)(x.requires_grad_()).sum(),
                               x)[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


class _Routed(nn.Module):
    """A batch-level defense in miniature: a bright image (mean > 0.8) fools the classifier, but a batch whose mean
    exceeds 0.5 is routed to a path that gets every image right."""

    def forward(self, x: Tensor) -> Tensor:
        right = F.one_hot(torch.arange(len(x)) % 3, 3).float()
        if x.mean() > 0.5:
            return right
        fooled = x.flatten(1).mean(1) > 0.8
        return torch.where(fooled[:, None], right.roll(1, dims=1), right)


def test_a_per_sample_mix_that_routes_differently_is_judged_whole() -> None:
    model, y = _Routed(), torch.arange(4) % 3
    a, b = torch.full((4, 1, 2, 2), 0.3), torch.full((4, 1, 2, 2), 0.3)
    a[0], b[1] = 0.9, 0.9  # each candidate fools one image and stays below the routing threshold

    def judge(z: Tensor) -> Tensor:
        return error_rates(model, z, y)

    assert judge(a).tolist() == [1, 0, 0, 0] and judge(b).tolist() == [0, 1, 0, 0]
    mixed = torch.cat([a[:1], b[1:]])  # per sample, the worst of both: two errors if judged image by image ...
    assert judge(mixed).sum() == 0  # ... but as a batch it is routed and every image is right
    assert torch.equal(strongest_batch(judge, [a, b]), a)  # a real batch with one error, never the mix
