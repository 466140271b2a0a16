"""Orthogonal and selective PGD (Bryniarski et al., ICLR 2022) against their definition: the per-image direction,
and one step on a toy defense whose detector score is linear in the image (so "leaves the detection unchanged to
first order" is exact)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from dad.attacks import AttackSpec, run_attack
from dad.attacks.orthogonal import evasion_pgd, orthogonal_direction
from dad.routing import Detection
from tests.conftest import tiny_defense


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(1)


def test_the_direction_follows_the_definition_per_image():
    g = torch.Generator().manual_seed(0)
    grad_f, grad_d = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    misclassified = torch.tensor([False, True, True, False])
    detected = torch.tensor([True, True, False, False])
    d = orthogonal_direction(grad_f, grad_d, misclassified, detected)
    for i in (0, 3):  # not yet fooled: the classifier's gradient without its detector component
        assert abs(float(_dot(d, grad_d)[i])) < 1e-5
        assert float(_dot(d, grad_f)[i]) > 0
        torch.testing.assert_close(d[i] + (_dot(grad_f, grad_d)[i] / _dot(grad_d, grad_d)[i]) * grad_d[i], grad_f[i])
    assert abs(float(_dot(d, grad_f)[1])) < 1e-5 and float(_dot(d, grad_d)[1]) < 0  # fooled, seen: lower detection
    assert d[2].abs().max() == 0  # fooled and unseen: done
    s = orthogonal_direction(grad_f, grad_d, misclassified, detected, orthogonal=False)
    torch.testing.assert_close(s[0], grad_f[0])
    torch.testing.assert_close(s[1], -grad_d[1])
    assert s[2].abs().max() == 0


class _ToyDefense(torch.nn.Module):
    """A linear classifier and a per-sample test whose score ``a . x`` is linear; threshold ``t``."""

    def __init__(self, weight: Tensor, a: Tensor, t: float) -> None:
        super().__init__()
        self.weight, self.a, self.t = weight, a, t

    def known_rows(self, images: Tensor) -> None:
        raise AssertionError("no filler here")

    def classify_with_features(self, x: Tensor, known: None = None) -> tuple[Tensor, Tensor]:
        return x.flatten(1) @ self.weight.T, x.flatten(1)

    def detect(self, x: Tensor, features: Tensor) -> Detection:
        excess = (features @ self.a - self.t) / abs(self.t)
        return Detection(score=excess.mean(), batch_excess=None, sample_excess=excess, flags=excess > 0)


def test_one_step_on_a_linear_detector_keeps_its_score_while_the_classifier_is_not_yet_fooled():
    g = torch.Generator().manual_seed(1)
    n, dim = 6, 16
    weight, a = torch.randn(3, dim, generator=g), torch.randn(dim, generator=g)
    x = 0.5 + 0.01 * torch.randn(n, 1, 4, 4, generator=g)  # inside [0, 1] with room for a step
    y = (x.flatten(1) @ weight.T).argmax(1)  # every image right at the start
    defense = _ToyDefense(weight, a, t=float((x.flatten(1) @ a).mean()) - 1.0)  # every image detected
    spec = AttackSpec(name="orthogonal_pgd", threat="defense", objective="evade_clean", norm="l2", eps=1.0,
                      step_size=0.05, steps=1, random_start=False)
    x_adv = evasion_pgd(defense, lambda z: torch.zeros(n), x, y, spec, "ce")
    step = (x_adv - x).flatten(1)
    assert (step.norm(dim=1) > 0.049).all()  # a full L2 step per image
    torch.testing.assert_close(step @ a, torch.zeros(n), atol=1e-5, rtol=0)  # the detector's score unchanged
    logits = (x.flatten(1) @ weight.T).requires_grad_(True)
    grad_logits = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), logits)[0]
    assert ((step @ weight.T) * grad_logits).sum(1).gt(0).all()  # and the classifier's loss raised
    selective_spec = AttackSpec(**{**spec.as_dict(), "name": "selective_pgd"})
    selective = evasion_pgd(defense, lambda z: torch.zeros(n), x, y, selective_spec, "ce", orthogonal=False)
    assert ((selective - x).flatten(1) @ a).abs().max() > 1e-3  # without the projection the score moves


@pytest.mark.parametrize("routing", ["never", "always", "batch", "sample", "both"])
def test_it_runs_under_every_routing_and_without_a_detector_is_pgd_on_the_classifier(routing: str) -> None:
    """Under ``never`` (the backbone alone, how the leaderboards evaluate it) the tests give no gradient: every step
    ascends the classifier's loss until the image is misclassified."""
    defense = tiny_defense([10])
    defense.routing = routing
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(10, 1, 8, 8, generator=g), torch.randint(0, 10, (10,), generator=g)
    spec = AttackSpec(name="orthogonal_pgd", threat="defense", objective="evade_clean", eps=0.1, step_size=0.03,
                      steps=3)
    x_adv = run_attack(spec, defense, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    if routing == "never":
        with torch.no_grad():
            before, after = ((defense.classifier(z).argmax(1) != y).float().mean() for z in (x, x_adv))
        assert after >= before
