"""Warm starts: attacks through the defense continue from given AEs (the sanity phase's more-steps check)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dad.attacks import AttackSpec, run_attack
from dad.attacks.common import starting_from, warm_start
from dad.defense import DADDefense
from evaluation.state import AttackState
from lightning_modules.evaluator import DefenseEvaluator
from lightning_modules.stores import stored_aes
from tests.conftest import tiny_defense

B, EPS = 8, 0.1
LINF = {"threat": "defense", "norm": "linf", "eps": EPS, "step_size": 0.03, "steps": 3, "eot_samples": 2}
DEFENSE_ATTACKS = {
    "pgd": {**LINF, "name": "pgd", "lambdas": [0.0, 1.0]},
    "apgd": {**LINF, "name": "apgd", "loss": "ce+dlr"},
    "orthogonal_pgd": {**LINF, "name": "orthogonal_pgd", "objective": "evade_clean", "eot_samples": 1},
    "selective_pgd": {**LINF, "name": "selective_pgd", "objective": "evade_clean", "eot_samples": 1},
    "square": {**LINF, "name": "square", "steps": 20},
}


@pytest.fixture(scope="module")
def defense() -> DADDefense:
    defense = tiny_defense([B])
    defense.routing = "never"  # deterministic: the judge's draws agree
    return defense


@pytest.fixture(scope="module")
def settled_batch(defense: DADDefense) -> tuple[Tensor, Tensor, Tensor]:
    """Clean images, a point of their eps-ball, and labels the defense gets wrong there in every draw (a batch an
    attack that judges its start stops on at once)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(B, 1, 8, 8, generator=g) * 0.8 + 0.1
    points = x + 0.5 * EPS * torch.randn(x.shape, generator=g).sign()
    with torch.no_grad():
        y = (defense(points).argmax(1) + 1) % 10
    return x, points, y


def test_a_warm_start_is_projected_onto_the_ball_and_checked() -> None:
    x = torch.full((2, 1, 4, 4), 0.5)
    assert warm_start(x, EPS, "linf") is None  # outside a block
    far = x + torch.tensor([0.3, -0.05]).view(2, 1, 1, 1)
    with starting_from(far) as warm:
        start = warm_start(x, EPS, "linf")
    assert warm is not None and warm.used
    assert torch.allclose(start[0], x[0] + EPS) and torch.allclose(start[1], far[1])  # only what lies outside moves
    with starting_from(torch.zeros(3, 1, 4, 4)), pytest.raises(ValueError, match="warm start of the batch's shape"):
        warm_start(x, EPS, "linf")


@pytest.mark.parametrize("name", DEFENSE_ATTACKS)
def test_every_attack_through_the_defense_starts_from_the_warm_start(
        name: str, defense: DADDefense, settled_batch: tuple[Tensor, Tensor, Tensor]) -> None:
    """Started on a batch the defense already gets wrong everywhere, an attack judges it and stops there: it returns
    the warm start itself; from its own start (random, or Square's stripes) it returns another batch."""
    x, points, y = settled_batch
    spec = AttackSpec(**DEFENSE_ATTACKS[name])
    with starting_from(points) as warm:
        continued = run_attack(spec, defense, x, y)
    assert warm is not None and warm.used
    assert torch.equal(continued, points)
    assert not torch.equal(run_attack(spec, defense, x, y), points)


def test_the_evaluator_refuses_a_start_an_attack_cannot_take(
        defense: DADDefense, settled_batch: tuple[Tensor, Tensor, Tensor]) -> None:
    x, points, y = settled_batch
    classifier_pgd = AttackSpec(name="pgd", threat="classifier", norm="linf", eps=EPS, step_size=0.03, steps=2)
    evaluator = DefenseEvaluator(defense, {"pgd": classifier_pgd}, with_clean=False)
    with pytest.raises(ValueError, match="cannot start from stored AEs"):
        evaluator.attack(classifier_pgd, x, y, 0, start=points)


def test_stored_aes_are_those_of_the_batch_or_a_clear_error(settled_batch: tuple[Tensor, Tensor, Tensor]) -> None:
    x, points, _ = settled_batch
    index = torch.arange(B)
    store = AttackState("key", {0: {"index": index, "x_adv": points}})
    assert stored_aes(None, 0, index, x) is None
    assert torch.equal(stored_aes(store, 0, index, x), points)
    for batch_idx, other in ((1, index), (0, index + B)):
        with pytest.raises(ValueError, match=f"stored AEs of batch {batch_idx}"):
            stored_aes(store, batch_idx, other, x)
