"""An attack's runs along a leading dimension (:mod:`dad.defense_runs`, :mod:`dad.attacks.run_stack`) against each
run alone and against the reference loop: each run is its own detector batch, the stacked attack gives the looped
one's AEs for fixed seeds whatever the chunk size, spends the same defense passes, and stops only on a settled run.

Exact agreement (up to the order of floating-point sums) needs the same random numbers in the same order, so those
tests use a noise-free purifier: with noise, the stack draws every run's start first and then each step's noise for
all runs at once, while the loop interleaves them; the runs are then equal in distribution, not draw by draw."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dad.attacks import AttackSpec, run_attack
from dad.attacks.eot import eot_value_and_gradient
from dad.attacks.objectives import defense_objective
from dad.attacks.run_stack import stacked_runs
from dad.defense import DADDefense
from dad.defense_runs import forward_runs
from dad.purification import DenoiserPurifier
from dad.runs import CPU_PASS_ELEMENTS, counting_passes, looped_runs, run_chunks, runs_settings
from tests.conftest import tiny_defense

B, R = 8, 3
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def defense() -> DADDefense:
    noisy = tiny_defense([B, 2 * B], noise_std=0.2)
    return noisy.with_purifier(DenoiserPurifier(noisy.purifier.denoiser, 0.0))


@pytest.fixture(scope="module")
def stack() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(R, B, 1, 8, 8, generator=g), torch.randint(0, 10, (B,), generator=g)


@pytest.mark.parametrize("routing", ["batch", "sample", "both", "always", "never"])
@pytest.mark.parametrize("attacked", [B, 3])
def test_each_run_is_decided_as_its_own_batch(defense: DADDefense, stack: tuple[Tensor, Tensor], routing: str,
                                              attacked: int) -> None:
    """forward_runs on R runs gives each run what forward_draws gives its batch alone (with a clean filler too)."""
    defense.routing = routing
    x = stack[0][:, :attacked]
    known = defense.known_rows(torch.rand(B - attacked, 1, 8, 8)) if attacked < B else None
    out = forward_runs(defense, x, 2, known, first=attacked)
    assert out.logits.shape == (2, R, attacked, 10) and out.score.shape == (R,) and out.flags.shape == (R, B)
    for r in range(R):
        alone = defense.forward_draws(x[r], 2, known, first=attacked)
        torch.testing.assert_close(out.logits[:, r], alone.logits, **TOLERANCE)
        torch.testing.assert_close(out.score[r], alone.score, **TOLERANCE)
        assert torch.equal(out.flags[r], alone.flags)
    if routing == "batch":  # the runs really are decided apart: their scores differ
        assert out.score.unique().numel() == R


@pytest.mark.parametrize("objective", ["adaptive", "evade_clean", "evade_denoised", "evade_soft", "evade_bpda"])
def test_a_stack_of_runs_has_each_runs_values_and_gradients(defense: DADDefense, stack: tuple[Tensor, Tensor],
                                                            objective: str) -> None:
    """Per-run penalty weights and losses: the stack's EOT values and gradients are each run's, computed alone."""
    defense.routing = "both"
    x, y = stack
    lams, losses = (1.0, 10.0, 100.0), ("ce", "dlr", "ce")
    x_var = x.clone().requires_grad_(True)
    values = defense_objective(defense, y, objective, lams, losses).draws(x_var, 1)[0]
    grads = torch.autograd.grad(values.sum(), x_var)[0]
    stacked = defense_objective(defense, y, objective, lams, losses).draws(x, 2)
    assert stacked.shape == (2, R, B)
    for r in range(R):
        alone = defense_objective(defense, y, objective, lams[r], losses[r])
        value, grad = eot_value_and_gradient(alone, x[r], 1)
        torch.testing.assert_close(values[r].detach(), value, **TOLERANCE)
        torch.testing.assert_close(grads[r], grad, **TOLERANCE)
        torch.testing.assert_close(stacked[:, r], alone.draws(x[r], 2), **TOLERANCE)


def test_evade_eps_refuses_a_stack(defense: DADDefense, stack: tuple[Tensor, Tensor]) -> None:
    with pytest.raises(ValueError, match="one batch at a time"):
        defense_objective(defense, stack[1], "evade_eps", (1.0,) * R).draws(stack[0], 1)


SPECS = {
    "evade_clean": dict(name="apgd", threat="defense", objective="evade_clean", loss="ce+dlr", eps=0.3, steps=6,
                        lambdas=[1.0, 10.0], draws=2),
    "autoattack_rand": dict(name="apgd", threat="defense", loss="ce+dlr", eps=0.3, steps=6, eot_samples=2,
                            restarts=2, draws=2),
    "evade_bpda": dict(name="apgd", threat="defense", objective="evade_bpda", loss="ce", eps=0.3, steps=6,
                       eot_samples=2, lambdas=[0.0, 1.0], draws=2),
    "orthogonal_pgd": dict(name="orthogonal_pgd", threat="defense", objective="evade_clean", loss="ce+dlr", eps=0.3,
                           step_size=0.1, steps=6, restarts=2, draws=2),
    "pgd_adaptive": dict(name="pgd", threat="defense", loss="ce+dlr", eps=0.3, step_size=0.1, steps=6, eot_samples=2,
                         lambdas=[0.0, 1.0], draws=2),
}


def _attack(defense: DADDefense, spec: dict, x: Tensor, y: Tensor) -> Tensor:
    torch.manual_seed(5)
    return run_attack(AttackSpec(**spec), defense, x, y)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_stacked_attack_equals_the_looped_runs_whatever_the_chunk_size(
        defense: DADDefense, stack: tuple[Tensor, Tensor], name: str) -> None:
    """Four runs of APGD, PGD or orthogonal PGD (two losses x two weights or two restarts): stacked in one program,
    in chunks of one or two runs, and looped, the same AEs and the same defense passes; the stack without a cap makes
    a fraction of the programs."""
    defense.routing = "both"
    x, y = stack[0][0], stack[1]
    with looped_runs(), counting_passes() as looped_count:
        looped = _attack(defense, SPECS[name], x, y)
    for cap in (None, B, 2 * B):
        with runs_settings(early_stop=False, max_images=cap), counting_passes() as count:
            stacked = _attack(defense, SPECS[name], x, y)
        torch.testing.assert_close(stacked, looped, **TOLERANCE)
        assert count.passes == looped_count.passes
        if cap is None:  # one program per step for all four runs and their draws; a cap of B images is the loop's
            assert count.programs < looped_count.programs / 3


def test_a_settled_run_ends_the_stack_and_nothing_else_does() -> None:
    """Chunks of one run: the second run's batch is wrong everywhere, so the third and fourth never run; a batch
    with one sample right in one draw stops nothing."""
    x = torch.zeros(4, 1, 2, 2)
    made: list[float] = []

    def run(losses: tuple[str, ...], lams: tuple[float, ...]) -> Tensor:
        made.extend(lams)
        return x + lams[0]

    def judge(z: Tensor) -> Tensor:  # (R, n): the run of weight 1 is settled; the others nearly
        rates = torch.full(z.shape[:2], 0.9)
        rates[z[:, 0, 0, 0, 0] == 1.0] = 1.0
        return rates

    settings = [("ce", 0.0), ("ce", 1.0), ("ce", 2.0), ("ce", 3.0)]
    with runs_settings(max_images=len(x)), counting_passes() as count:
        assert torch.equal(stacked_runs(judge, settings, run, x), x + 1.0)
    assert made == [0.0, 1.0] and count.stops == 1

    def nearly(z: Tensor) -> Tensor:
        rates = torch.ones(z.shape[:2])
        rates[:, 0] = 0.5
        return rates

    made.clear()
    with runs_settings(max_images=len(x)), counting_passes() as count:
        stacked_runs(nearly, settings, run, x)
    assert made == [0.0, 1.0, 2.0, 3.0] and count.stops == 0


def test_a_cpu_pass_takes_a_bounded_number_of_image_elements() -> None:
    """Without a configured cap, CPU passes stop at CPU_PASS_ELEMENTS (CIFAR-10: two batches of 100 a pass) while
    small images and other devices take every run at once; a configured cap wins."""
    cifar, digits = torch.zeros(3, 32, 32), torch.zeros(1, 8, 8)
    assert CPU_PASS_ELEMENTS == 200 * cifar.numel()
    assert run_chunks(8, 100, cifar) == [2, 2, 2, 2]  # four stacked runs x two EOT draws: 200 images a pass
    assert run_chunks(3, 150, cifar) == [1, 1, 1]  # at least one run a pass
    assert run_chunks(20, 50, digits) == [20]
    assert run_chunks(8, 100, torch.zeros(3, 32, 32, device="meta")) == [8]  # not a CPU: no cap
    assert run_chunks(8, 100) == [8]  # no image given: no cap
    with runs_settings(max_images=400):
        assert run_chunks(8, 100, cifar) == [4, 4]
