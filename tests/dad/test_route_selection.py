"""The defense stage's choice of route (dad.route_selection): the rule on made-up evidence, and the choice on a
defense whose candidate routes are known to be weaker or stronger than its backbone."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from dad.attacks import AttackSpec
from dad.defense import DADDefense
from dad.detector import MMDDetector
from dad.kernels import SemanticKernel
from dad.models import create_model
from dad.purification import IdentityPurifier, Purifier
from dad.route_selection import RouteEvidence, RouteSelectionSettings, choose_route, measure_route


def _evidence(name: str, right: int, n: int = 100, only: float | None = None, seconds: float = 1.0) -> RouteEvidence:
    correct = torch.arange(n) < right
    classifier_only = None if only is None else torch.arange(n) < round(only * n)
    return RouteEvidence(name, {"attack": correct}, classifier_only, seconds)


def test_the_best_worst_case_wins_ties_go_to_classifier_only_robustness_then_to_the_cheaper_route():
    chosen, table = choose_route([_evidence("denoiser", 10), _evidence("identity", 50)])
    assert chosen == "identity" and not table["denoiser"]["tied"]  # 40 points apart on 100 paired samples
    assert table["denoiser"]["vs_best"][0] == pytest.approx(-0.4) and table["denoiser"]["vs_best"][2] < 0
    chosen, table = choose_route([_evidence("identity", 3, only=0.0), _evidence("denoiser", 2, only=0.8)])
    assert table["denoiser"]["tied"] and chosen == "denoiser"  # 0.02 vs 0.03: a tie; 0.8 classifier-only wins
    slow, fast = _evidence("denoiser", 2, only=0.5, seconds=2.0), _evidence("identity", 2, only=0.5, seconds=0.1)
    chosen, _ = choose_route([slow, fast])
    assert chosen == "identity"  # tied twice: the cheaper route
    with pytest.raises(ValueError):
        choose_route([])


def test_settings_refuse_unknown_routes_and_attacks_of_the_wrong_threat():
    with pytest.raises(ValueError, match="routes"):
        RouteSelectionSettings(routes=["denoiser", "nope"])
    settings = RouteSelectionSettings(routes=["denoiser", "identity"], attacks=["adaptive"], classifier_attack="pgd")
    attacks = {"adaptive": AttackSpec(name="pgd", threat="defense", eps=0.1, steps=1),
               "pgd": AttackSpec(name="pgd", threat="classifier", eps=0.1, steps=1)}
    settings.check(attacks, selection_size=50)
    assert RouteSelectionSettings(routes=["identity"]).attack_names(attacks) == ["adaptive"]  # default: the white box
    with pytest.raises(ValueError, match="selection_size"):
        settings.check(attacks, selection_size=0)
    with pytest.raises(ValueError, match="threat defense"):
        RouteSelectionSettings(routes=["denoiser", "identity"], attacks=["pgd"]).check(attacks, 50)
    RouteSelectionSettings(routes=["identity"], attacks=["pgd"]).check(attacks, 0)  # one route: nothing measured


class _Snap(Purifier):
    """Each image replaced by its nearest stored image (no gradient reaches the input: a masking route, strong
    only because the attacks here are gradient-based; enough to be a route stronger than the backbone)."""

    def __init__(self, images: Tensor) -> None:
        super().__init__()
        self.images = images

    def forward(self, x: Tensor) -> Tensor:
        nearest = torch.cdist(x.flatten(1), self.images.flatten(1)).argmin(1)
        return self.images[nearest] + 0.0 * x


class _Blank(Purifier):
    """Every image replaced by a grey one: a route weaker than any trained backbone."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.0 * x + 0.5


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    return x[:1500], y[:1500], x[1500:1600], y[1500:1600]


def _defense(train_x: Tensor, train_y: Tensor) -> DADDefense:
    """A nearest-centroid linear classifier (robust at small eps, not at large), routing ``always``."""
    centroids = torch.stack([train_x[train_y == c].flatten(1).mean(0) for c in range(10)])
    linear = nn.Linear(64, 10)
    with torch.no_grad():
        linear.weight.copy_(2 * centroids)
        linear.bias.copy_(-(centroids ** 2).sum(1))
    torch.manual_seed(0)
    phi = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    detector = MMDDetector(SemanticKernel(phi, sigma_phi=10.0, sigma_q=128.0), train_x[:20])
    return DADDefense(nn.Sequential(nn.Flatten(), linear).eval(), detector, IdentityPurifier(), routing="always")


@pytest.mark.parametrize("eps, candidate, expected", [(0.05, "blank", "identity"), (0.3, "snap", "snap")])
def test_the_choice_keeps_the_backbone_against_a_weaker_route_and_a_stronger_route_over_it(
        digits, eps, candidate, expected):
    train_x, train_y, x, y = digits
    defense = _defense(train_x, train_y)
    attack = AttackSpec(name="pgd", threat="defense", norm="linf", eps=eps, step_size=eps / 4, steps=10)
    only = AttackSpec(name="pgd", threat="classifier", norm="linf", eps=eps, step_size=eps / 4, steps=10)
    routes = {"identity": IdentityPurifier(), "blank": _Blank(), "snap": _Snap(train_x)}
    evidence = [measure_route(name, defense.with_purifier(routes[name]), {"pgd": attack}, only, x, y, 25, 2)
                for name in ("identity", candidate)]
    chosen, table = choose_route(evidence)
    assert chosen == expected, table
    backbone, other = (table[name]["worst_case"] for name in ("identity", candidate))
    assert (backbone > other + 0.3) if expected == "identity" else (other > backbone + 0.3), table


def test_the_backbone_route_classifies_flagged_images_exactly_as_the_backbone_alone(digits):
    """Why a defense that keeps ``identity`` cannot be less robust than its backbone: every image, flagged or not,
    gets the backbone's logits in every draw, so any attack on it is an attack on the backbone."""
    train_x, train_y, x, _ = digits
    defense = _defense(train_x, train_y)  # routing ``always``: every image flagged and purified
    with torch.no_grad():
        out, alone = defense.forward_draws(x, 3), defense.classifier(x)
    assert bool(out.flags.all())
    torch.testing.assert_close(out.logits, alone.expand(3, *alone.shape), rtol=0.0, atol=1e-6)
