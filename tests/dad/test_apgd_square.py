"""APGD and Square against their definitions: schedules, balls, strength, and whole-batch judging."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dad.attacks import AttackSpec, pgd, run_attack
from dad.attacks.apgd import apgd, checkpoints
from dad.attacks.judging import error_rates
from dad.attacks.objectives import classification_loss
from dad.attacks.square import square, square_fraction


def test_apgd_checkpoints_follow_the_reference() -> None:
    # p_1 = 0.22, then intervals shrinking by 0.03 N down to 0.06 N (the paper's p_j, in integer steps)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(50) == [11, 21, 30, 38, 45]
    for steps in (10, 37, 200):
        marks = checkpoints(steps)
        gaps = [b - a for a, b in zip([0, *marks], marks)]
        assert marks[0] == max(int(0.22 * steps), 1) and marks[-1] <= steps
        assert all(g >= max(int(0.06 * steps), 1) for g in gaps) and gaps == sorted(gaps, reverse=True)


@pytest.fixture(scope="module")
def linear() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every input starts correctly classified
    return model, x, y


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_apgd_stays_in_the_ball_and_beats_pgd_of_the_same_budget(linear, norm: str, eps: float) -> None:
    model, x, y = linear
    spec = AttackSpec(name="apgd", norm=norm, eps=eps, steps=20)
    torch.manual_seed(0)
    x_apgd = run_attack(spec, model, x, y)
    x_pgd = pgd(model, x, y, eps, eps / 10, 20, norm)
    distance = (x_apgd - x).flatten(1)
    radius = distance.abs().amax(1) if norm == "linf" else distance.norm(dim=1)
    assert (radius <= eps + 1e-5).all() and x_apgd.min() >= 0 and x_apgd.max() <= 1
    with torch.no_grad():
        acc_apgd = (model(x_apgd).argmax(1) == y).float().mean()
        acc_pgd = (model(x_pgd).argmax(1) == y).float().mean()
    assert acc_apgd <= acc_pgd and acc_apgd < 0.5


def test_apgd_returns_a_batch_it_judged_whole(linear) -> None:
    model, x, y = linear
    judged: list[Tensor] = []

    def judge(z: Tensor) -> Tensor:
        assert z.shape == x.shape  # every judgement sees the whole batch
        judged.append(z.clone())
        return error_rates(model, z, y)

    out = apgd(lambda z: classification_loss(model(z), y, "dlr"), judge, x, 0.05, steps=8)
    assert any(torch.equal(out, z) for z in judged)  # never a per-sample mix that was not judged as a batch
    best = max(judge(z).sum() for z in judged[:-1])
    assert judge(out).sum() == best


def test_square_fraction_schedule_and_ball(linear) -> None:
    assert square_fraction(0, 10_000) == 0.8 and square_fraction(11, 10_000) == 0.4
    assert square_fraction(9_000, 10_000) == pytest.approx(0.8 / 512)
    assert square_fraction(50, 100) == square_fraction(5_000, 10_000)  # the schedule scales with the budget
    model, x, y = linear
    torch.manual_seed(0)

    def margin_of(z: Tensor, count: int) -> Tensor:
        logits = model(z)
        true = logits.gather(1, y[:, None]).squeeze(1)
        return true - logits.scatter(1, y[:, None], float("-inf")).amax(1)

    x_adv = square(margin_of, lambda z: error_rates(model, z, y), x, 0.1, queries=200)
    assert (x_adv - x).abs().amax() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < 0.5  # gradient-free, still effective
