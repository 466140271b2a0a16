"""The inner maximisations of robust training against their definitions, on toy models whose paths are known."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from dad.attacks import pgd
from dad.attacks.common import random_delta
from dad.models import create_model
from dad.training.inner import FAT_TAU_SCHEDULE, FAT_TRADES_TAU_SCHEDULE, fat_examples, pgd_at_examples, trades_examples
from dad.training.losses import gairat_weights, global_mean, tau_schedule, trades_loss

STEP = 0.05
# first misclassified iterate m of each toy sample (m >= K = 5: never within the attack)
FIRST_WRONG = [0, 1, 2, 3, 4, 5, 6, 8]
K = 5


class MeanThreshold(nn.Module):
    """Two classes: logit 1 is ``mean(x) - 0.5``, logit 0 is 0. With label 0 the cross-entropy's input gradient is
    positive everywhere, so every signed step adds ``STEP`` to each pixel (until the ball or [0, 1] clip it)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        score = self.scale * (x.flatten(1).mean(dim=1) - 0.5)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def _toy_batch() -> tuple[Tensor, Tensor]:
    # mean(x + t STEP) > 0.5 exactly from t = m on, with a margin of STEP / 2 either side
    values = torch.tensor([0.525 - STEP * m for m in FIRST_WRONG])
    return values.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous(), torch.zeros(len(FIRST_WRONG), dtype=torch.long)


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10, in_channels=1)


@pytest.mark.parametrize("tau", [0, 1, 2, 3, K, 2 * K])
def test_fat_stops_tau_steps_after_the_first_misclassified_iterate(tau: int) -> None:
    x, y = _toy_batch()
    out = fat_examples(MeanThreshold(), x, y, eps=0.5, step_size=STEP, steps=K, tau=tau,
                       generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([min(m + tau, K) for m in FIRST_WRONG])
    assert torch.equal(out.steps, expected)
    # the iterate returned is x moved by its steps (the Gaussian term is 0.001 small)
    moved = x + STEP * expected.view(-1, 1, 1, 1)
    torch.testing.assert_close(out.examples, moved, rtol=0, atol=0.01)
    # kappa: the correctly classified iterates on the path, iterates 0 .. m - 1 (at most K)
    assert torch.equal(out.kappa, torch.tensor([min(m, K) for m in FIRST_WRONG]))


def test_fat_with_a_large_tau_and_no_gaussian_term_is_pgd_from_the_clean_image() -> None:
    model = _small_cnn()
    x, y = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(12) % 10
    out = fat_examples(model, x, y, eps=0.1, step_size=0.02, steps=4, tau=4, omega=0.0)
    reference = pgd(model, x, y, eps=0.1, step_size=0.02, steps=4, random_start=False)
    torch.testing.assert_close(out.examples, reference, rtol=0, atol=1e-6)
    assert torch.equal(out.steps, torch.full((12,), 4))


def test_fat_adds_the_gaussian_term_to_each_step() -> None:
    x, y = _toy_batch()
    generator = torch.Generator().manual_seed(3)
    out = fat_examples(MeanThreshold(), x, y, eps=0.5, step_size=STEP, steps=K, tau=K, omega=0.01,
                       generator=generator)
    noise = out.examples - (x + K * STEP)  # the sum of K Gaussian terms of std 0.01 per pixel
    assert noise.abs().amax() > 0 and noise.std().item() == pytest.approx(0.01 * math.sqrt(K), rel=0.5)


def test_fat_trades_starts_near_the_clean_image_and_ascends_the_kl() -> None:
    model = _small_cnn()
    x, y = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.arange(8)
    exact = copy.deepcopy(model).double().eval()  # scores the KL in float64

    def kl_after(steps: int) -> Tensor:
        out = fat_examples(model, x, y, eps=0.1, step_size=0.02, steps=steps, tau=3, omega=0.0, loss="kl",
                           generator=torch.Generator().manual_seed(0))
        assert (out.examples - x).abs().amax() <= 0.1 + 1e-6
        with torch.no_grad():  # in float64: the start's KL (~1e-8) is below float32's rounding of the logits
            return torch.nn.functional.kl_div(exact(out.examples.double()).log_softmax(1),
                                              exact(x.double()).softmax(1), reduction="sum")

    model.eval()
    start = kl_after(0)
    torch.testing.assert_close(  # the start is TRADES' x + 0.001 N(0, 1)
        fat_examples(model, x, y, 0.1, 0.02, 0, tau=0, loss="kl", generator=torch.Generator().manual_seed(0))[0],
        (x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1))
    assert 0 < start and kl_after(3) > 10 * start


def test_pgd_at_starts_uniformly_in_the_ball() -> None:
    x = torch.full((64, 1, 8, 8), 0.5)
    out = pgd_at_examples(_small_cnn(), x, torch.zeros(64, dtype=torch.long), eps=0.1, step_size=0.02, steps=0,
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.examples, x + random_delta(x, 0.1, "linf", torch.Generator().manual_seed(0)))
    delta = out.examples - x
    assert delta.abs().amax() <= 0.1 + 1e-7 and delta.amax() > 0.099 and delta.amin() < -0.099
    assert delta.mean().abs() < 0.005 and delta.std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.05)
    assert torch.equal(out.steps, torch.zeros(64, dtype=torch.long)) and torch.equal(out.kappa, out.steps)


def test_pgd_at_examples_stay_in_the_ball_and_in_the_unit_range() -> None:
    model = _small_cnn()
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    out = pgd_at_examples(model, x, y, eps=0.2, step_size=0.05, steps=4)
    assert (out.examples - x).abs().amax() <= 0.2 + 1e-6
    assert out.examples.amin() >= 0 and out.examples.amax() <= 1
    assert torch.equal(out.steps, torch.full((16,), 4)) and ((out.kappa >= 0) & (out.kappa <= 4)).all()


def test_gairat_kappa_counts_the_correct_iterates_of_the_pgd_path() -> None:
    x, y = _toy_batch()
    eps = 0.1
    out = pgd_at_examples(MeanThreshold(), x, y, eps=eps, step_size=STEP, steps=K,
                          generator=torch.Generator().manual_seed(0))
    # the path: every signed step is +STEP on each pixel, then the projection on the ball and [0, 1]
    iterate = (x + random_delta(x, eps, "linf", torch.Generator().manual_seed(0))).clamp(0, 1)
    correct = torch.zeros(len(x), dtype=torch.long)
    for _ in range(K):
        correct += (iterate.flatten(1).mean(1) <= 0.5).long()
        iterate = torch.minimum(iterate + STEP, x + eps).clamp(0, 1)
    torch.testing.assert_close(out.examples, iterate)
    assert torch.equal(out.kappa, correct) and 0 < correct.sum() < K * len(x)


def test_trades_starts_at_a_small_gaussian_around_the_image() -> None:
    x = torch.full((64, 1, 8, 8), 0.5)
    out = trades_examples(_small_cnn(), x, eps=0.1, step_size=0.02, steps=0, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.examples, x + 0.001 * noise)
    delta = out.examples - x
    assert delta.mean().abs() < 1e-4 and delta.std().item() == pytest.approx(0.001, rel=0.05)
    assert out.kappa is None


def test_trades_examples_ascend_the_kl_inside_the_ball() -> None:
    model = _small_cnn()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    out = trades_examples(model, x, eps=0.1, step_size=0.02, steps=3)
    model.eval()
    with torch.no_grad():
        start_kl = torch.nn.functional.kl_div(model((x + 0.001 * torch.randn_like(x)).clamp(0, 1)).log_softmax(1),
                                              model(x).softmax(1), reduction="sum")
        kl = torch.nn.functional.kl_div(model(out.examples).log_softmax(1), model(x).softmax(1), reduction="sum")
    assert kl > 10 * start_kl and (out.examples - x).abs().amax() <= 0.1 + 1e-6
    assert torch.equal(out.steps, torch.full((8,), 3))


def test_trades_loss_is_clean_cross_entropy_plus_beta_times_the_mean_kl() -> None:
    clean, adv, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    p, q = clean.softmax(1), adv.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    expected = torch.nn.functional.cross_entropy(clean, y) + 6.0 * kl
    torch.testing.assert_close(trades_loss(clean, adv, y, 6.0), expected)
    torch.testing.assert_close(trades_loss(clean, clean, y, 6.0), torch.nn.functional.cross_entropy(clean, y))


def test_gairat_weights_follow_the_formula_and_have_mean_one() -> None:
    kappa, steps = torch.tensor([0, 1, 3, 5, 7, 10]), 10
    raw = torch.tensor([(1 + math.tanh(-1.0 + 5 * (1 - 2 * k / steps))) / 2 for k in kappa.tolist()])
    weights = gairat_weights(kappa, steps)
    torch.testing.assert_close(weights, raw / raw.mean())
    assert weights.mean().item() == pytest.approx(1.0)
    assert (weights[1:] < weights[:-1]).all()  # closer to the boundary (small kappa): larger weight
    # lambda shifts the weights; the normaliser is pluggable (the global batch's mean under DDP)
    flat = gairat_weights(kappa, steps, lam=2.0)
    assert flat.max() / flat.min() < weights.max() / weights.min()
    torch.testing.assert_close(gairat_weights(kappa, steps, mean=lambda w: w.new_tensor(2.0)), raw / 2)
    torch.testing.assert_close(global_mean(raw), raw.mean())


@pytest.mark.parametrize(
    ("fraction", "fat", "fat_trades"),
    [(0.0, 0, 0), (0.34, 0, 0), (0.35, 0, 1), (0.399, 0, 1), (0.4, 1, 1), (0.6, 1, 2), (0.749, 1, 2), (0.75, 2, 2),
     (0.8, 2, 3), (0.99, 2, 3)],
)
def test_tau_schedules(fraction: float, fat: int, fat_trades: int) -> None:
    assert tau_schedule(fraction, *FAT_TAU_SCHEDULE) == fat
    assert tau_schedule(fraction, *FAT_TRADES_TAU_SCHEDULE) == fat_trades


@pytest.mark.parametrize(
    "attack",
    [
        lambda m, x, y: pgd_at_examples(m, x, y, 0.1, 0.02, 2),
        lambda m, x, y: trades_examples(m, x, 0.1, 0.02, 2),
        lambda m, x, y: fat_examples(m, x, y, 0.1, 0.02, 2, tau=1),
        lambda m, x, y: fat_examples(m, x, y, 0.1, 0.02, 2, tau=1, loss="kl"),
    ],
    ids=["pgd_at", "trades", "fat", "fat_trades"],
)
def test_the_inner_loop_leaves_gradients_modes_and_statistics_alone(attack) -> None:
    model = _small_cnn().train()
    frozen_bn = model.body[1][1]
    frozen_bn.eval()  # a deliberately frozen submodule inside a model in train mode
    model.head.bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    attack(model, x, y)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    for key, value in model.state_dict().items():  # eval-mode batch norm: running statistics untouched
        assert torch.equal(value, state[key]), key


def test_the_inner_loop_runs_under_no_grad_callers() -> None:
    model = _small_cnn()
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()
    with torch.no_grad():
        out = fat_examples(model, x_inf, y_inf, 0.1, 0.02, 2, tau=0)
    assert out.examples.shape == x.shape


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, x, y: pgd_at_examples(m, x, y, 0.0, 0.1, 1), "`eps` > 0"),
        (lambda m, x, y: pgd_at_examples(m, x, y, 0.1, -1.0, 1), "`step_size` > 0"),
        (lambda m, x, y: trades_examples(m, x, 0.1, 0.1, -1), "`steps` to be an integer >= 0"),
        (lambda m, x, y: fat_examples(m, x, y, 0.1, 0.1, 2, tau=-1), "`tau` to be an integer >= 0"),
        (lambda m, x, y: fat_examples(m, x, y, 0.1, 0.1, 2, tau=0, omega=-0.1), "`omega` >= 0"),
        (lambda m, x, y: fat_examples(m, x, y, 0.1, 0.1, 2, tau=0, loss="margin"), "`loss` in"),
        (lambda m, x, y: pgd_at_examples(m, x * 255, y, 0.1, 0.1, 1), "images in \\[0, 1\\]"),
        (lambda m, x, y: gairat_weights(y, 0), "`steps` to be an integer >= 1"),
        (lambda m, x, y: tau_schedule(0.5, (0.5,), (0,)), "one more value than boundaries"),
    ],
)
def test_invalid_arguments_are_rejected(call, message: str) -> None:
    x, y = _toy_batch()
    with pytest.raises(ValueError, match=message):
        call(MeanThreshold(), x, y)
