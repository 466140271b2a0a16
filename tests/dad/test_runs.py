"""Batched runs (:mod:`dad.runs`) against the reference loop: equal for fixed seeds, whatever the chunk size; early
stops only on batches no run could change; the pass counts of the reference loop are the budget the report states."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from dad.attacks import AttackSpec, run_attack
from dad.attacks.apgd import apgd
from dad.attacks.budget import budget_passes
from dad.attacks.defense_pgd import defense_pgd
from dad.attacks.eot import eot_value_and_gradient
from dad.attacks.judging import settled, strongest_batch, strongest_run
from dad.attacks.objectives import defense_objective
from dad.attacks.spec import DEFENSE_OBJECTIVES
from dad.defense import DADDefense
from dad.purification import DenoiserPurifier
from dad.runs import PassCount, counting_passes, looped_runs, run_chunks, runs_settings
from tests.conftest import tiny_defense

B = 8
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
"""Batched and looped runs draw the same numbers (each run's noise has B x 64 elements, a multiple of 16); they
differ only in the order of floating-point sums."""


@pytest.fixture(scope="module")
def defense() -> DADDefense:
    return tiny_defense([B, 2 * B], noise_std=0.2)


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(B, 1, 8, 8, generator=g), torch.randint(0, 10, (B,), generator=g)


def _seeded(fn: Callable[[], object], seed: int = 3) -> object:
    torch.manual_seed(seed)
    return fn()


@pytest.mark.parametrize("routing", ["batch", "both", "always"])
@pytest.mark.parametrize("objective", DEFENSE_OBJECTIVES)
def test_batched_eot_equals_the_loop(defense: DADDefense, batch: tuple[Tensor, Tensor], objective: str,
                                     routing: str) -> None:
    """EOT values and gradients of every objective over 3 draws: one batched program equals three calls."""
    defense.routing = routing
    x, y = batch
    objective_fn = defense_objective(defense, y, objective, lam=1.0, loss="dlr")
    batched = _seeded(lambda: eot_value_and_gradient(objective_fn, x, 3))
    with looped_runs():
        looped = _seeded(lambda: eot_value_and_gradient(defense_objective(defense, y, objective, 1.0, "dlr"), x, 3))
    torch.testing.assert_close(batched, looped, **TOLERANCE)


@pytest.mark.parametrize("objective", ["adaptive", "evade_clean", "evade_denoised", "evade_bpda"])
def test_mixed_batches_pass_the_filler_once_and_agree_with_the_loop(
        defense: DADDefense, batch: tuple[Tensor, Tensor], objective: str) -> None:
    """With clean filler, the batched objective passes only the attacked images through the classifier (the filler's
    pass is made once) and gives the loop's values; noise-free, so the filler's purification draws do not matter."""
    defense.routing = "batch"
    noiseless = defense.with_purifier(DenoiserPurifier(defense.purifier.denoiser, 0.0))
    x, y, filler = batch[0][:3], batch[1][:3], torch.rand(B - 3, 1, 8, 8)
    sizes: list[int] = []
    hook = noiseless.classifier.body.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        objective_fn = defense_objective(noiseless, y, objective, 1.0, filler=filler)
        sizes.clear()
        batched = eot_value_and_gradient(objective_fn, x, 2)
    finally:
        hook.remove()
    with looped_runs():
        looped = eot_value_and_gradient(defense_objective(noiseless, y, objective, 1.0, filler=filler), x, 2)
    torch.testing.assert_close(batched, looped, **TOLERANCE)
    assert sizes and all(size % 3 == 0 for size in sizes)  # the attacked images (runs of them), never the filler


@pytest.mark.parametrize("routing", ["batch", "both"])
def test_forward_draws_equal_the_loop_and_the_on_device_selection(defense: DADDefense, batch: tuple[Tensor, Tensor],
                                                                  routing: str) -> None:
    defense.routing = routing
    x = batch[0].clone()
    x[: B // 2] = x[: B // 2] * 0.2  # a batch some of whose images the per-sample test flags
    batched = _seeded(lambda: defense.forward_draws(x, 4).logits)
    with looped_runs():
        looped = _seeded(lambda: defense.forward_draws(x, 4).logits)
    torch.testing.assert_close(batched, looped, **TOLERANCE)
    noiseless = defense.with_purifier(DenoiserPurifier(defense.purifier.denoiser, 0.0))
    on_host = noiseless.forward_draws(x, 2)
    noiseless._purifies_every_image = lambda x: True  # type: ignore[method-assign]  # the accelerator's path
    on_device = noiseless.forward_draws(x, 2)
    torch.testing.assert_close(on_device.logits, on_host.logits, **TOLERANCE)


@pytest.mark.parametrize("objective", ["adaptive", "evade_denoised", "evade_bpda"])
def test_results_do_not_depend_on_the_chunk_size(defense: DADDefense, batch: tuple[Tensor, Tensor],
                                                 objective: str) -> None:
    """A whole attack (APGD, EOT 3, judged over 3 draws) gives the same AEs with no cap and with caps that split its
    runs into chunks of one and two."""
    defense.routing = "both"
    x, y = batch
    spec = AttackSpec(name="apgd", threat="defense", norm="linf", eps=0.1, steps=4, eot_samples=3, draws=3,
                      objective=objective)
    results = []
    for cap in (None, B, 2 * B):
        with runs_settings(max_images=cap, early_stop=False):
            results.append(_seeded(lambda: run_attack(spec, defense, x, y)))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], **TOLERANCE)


def test_run_chunks_cover_the_runs_within_the_cap() -> None:
    assert run_chunks(5, 10) == [5]
    with runs_settings(max_images=25):
        assert run_chunks(5, 10) == [2, 2, 1]
    with runs_settings(max_images=3):
        assert run_chunks(2, 10) == [1, 1]  # one run a chunk at least
    with looped_runs():
        assert run_chunks(3, 10) == [1, 1, 1]
    with pytest.raises(ValueError, match="max_images"):
        with runs_settings(max_images=0):
            pass


class _Counting:
    """An objective counting its evaluations (values: the pixel sum, so the gradient is never zero)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        return z.flatten(1).sum(1)


def _judge_wrong_from(call: int, stubborn: bool = False) -> Callable[[Tensor], Tensor]:
    """A judge that finds every sample wrong in every draw from its ``call``-th call on (with ``stubborn``, sample 0
    stays right in one draw of three: the batch is never settled)."""
    calls = [0]

    def judge(z: Tensor) -> Tensor:
        calls[0] += 1
        rates = torch.full((len(z),), 1.0 if calls[0] >= call else 0.0)
        if stubborn:
            rates[0] = 2 / 3
        return rates

    return judge


@pytest.mark.parametrize("engine", ["apgd", "defense_pgd"])
def test_early_stop_only_on_settled_batches(engine: str, batch: tuple[Tensor, Tensor]) -> None:
    x, steps = batch[0], 12
    run = {"apgd": lambda objective, judge: apgd(objective, judge, x, 0.1, steps, eot_samples=2),
           "defense_pgd": lambda objective, judge: defense_pgd(objective, judge, x, 0.1, 0.02, steps, eot_samples=2)}
    full = {"apgd": (steps + 1) * 2, "defense_pgd": steps * 2}[engine]
    stubborn = _Counting()
    run[engine](stubborn, _judge_wrong_from(1, stubborn=True))  # one sample could still change: the whole budget
    assert stubborn.calls == full
    settling = _Counting()
    run[engine](settling, _judge_wrong_from(3))  # settled at its third judgement: stops there
    assert 0 < settling.calls < full
    with runs_settings(early_stop=False):
        off = _Counting()
        run[engine](off, _judge_wrong_from(1))
    assert off.calls == full
    assert settled(torch.ones(4)) and not settled(torch.tensor([1.0, 1.0, 2 / 3, 1.0]))


def test_strongest_run_skips_only_runs_that_could_not_win() -> None:
    candidates = [torch.full((3, 1, 2, 2), float(i)) for i in range(4)]
    ran: list[int] = []

    def run(i: int) -> Callable[[], Tensor]:
        return lambda: ran.append(i) or candidates[i]

    def judge(z: Tensor) -> Tensor:  # candidate 1 is wrong everywhere, the others partly
        return torch.ones(3) if z[0, 0, 0, 0] == 1 else torch.tensor([1.0, 0.0, 0.5])

    assert torch.equal(strongest_run(judge, [run(i) for i in range(4)]), candidates[1]) and ran == [0, 1]
    ran.clear()

    def unsettled(z: Tensor) -> Tensor:
        return torch.tensor([0.0, 1.0, z[0, 0, 0, 0].item() / 4])

    expected = strongest_batch(unsettled, candidates)
    assert torch.equal(strongest_run(unsettled, [run(i) for i in range(4)]), expected) and ran == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["autoattack_rand", "adaptive_pgd", "square"])
def test_the_loop_makes_the_budgeted_passes_and_batching_fewer_programs(name: str, defense: DADDefense,
                                                                        batch: tuple[Tensor, Tensor]) -> None:
    defense.routing = "both"
    x, y = batch
    spec = AttackSpec(**{
        "autoattack_rand": {"name": "apgd", "loss": "ce+dlr", "steps": 5, "eot_samples": 3, "restarts": 2},
        "adaptive_pgd": {"name": "pgd", "step_size": 0.02, "steps": 5, "eot_samples": 3, "lambdas": [0.0, 1.0]},
        "square": {"name": "square", "steps": 25, "eot_samples": 2},
    }[name], threat="defense", norm="linf", eps=0.005 if name == "square" else 0.1, draws=3)  # square: every query
    with looped_runs(), counting_passes() as looped:
        run_attack(spec, defense, x, y)
    with runs_settings(early_stop=False), counting_passes() as batched:
        run_attack(spec, defense, x, y)
    assert looped == PassCount(budget_passes(spec), budget_passes(spec), 0)
    assert batched.passes == budget_passes(spec) and batched.programs < batched.passes / 2
