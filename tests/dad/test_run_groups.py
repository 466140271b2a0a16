"""The groups of a mixed-batch attack as one stack of runs (:mod:`dad.attacks.run_stack`): ``G`` independent
batches of ``k`` attacked images, each among its own clean filler and labels, attacked together give each group
what it gets attacked alone (noise-free purifier and no random start, so the random numbers' order is moot;
tolerance rtol 1e-4, atol 1e-5, the order of floating-point sums), each group decided as its own detector batch."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dad.attacks import AttackSpec, run_attack
from dad.attacks.judging import defense_judge
from dad.attacks.objectives import defense_objective
from dad.attacks.run_stack import stacks_groups
from dad.defense import DADDefense
from dad.purification import DenoiserPurifier
from dad.runs import counting_passes, looped_runs, runs_settings
from tests.conftest import tiny_defense

B, G, K = 8, 3, 2
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def defense() -> DADDefense:
    noisy = tiny_defense([B], noise_std=0.2)
    return noisy.with_purifier(DenoiserPurifier(noisy.purifier.denoiser, 0.0))


@pytest.fixture(scope="module")
def groups() -> tuple[Tensor, Tensor, Tensor]:
    """``G`` groups of ``K`` attacked images, their labels and each group's own filler of ``B - K`` images."""
    g = torch.Generator().manual_seed(2)
    return (torch.rand(G, K, 1, 8, 8, generator=g), torch.randint(0, 10, (G, K), generator=g),
            torch.rand(G, B - K, 1, 8, 8, generator=g))


@pytest.mark.parametrize("objective", ["adaptive", "evade_clean", "evade_denoised", "evade_bpda"])
def test_each_run_of_a_group_is_its_groups_batch(defense: DADDefense, groups: tuple[Tensor, Tensor, Tensor],
                                                 objective: str) -> None:
    """Two runs per group (group-major): values and judged rates of run (g, s) are those of group g's batch alone,
    with group g's labels and filler."""
    defense.routing = "both"
    x, y, filler = groups
    lams, losses = (1.0, 10.0) * G, ("ce", "dlr") * G
    z = x.repeat_interleave(2, 0)
    values = defense_objective(defense, y, objective, lams, losses, filler=filler).draws(z, 1)[0]
    rates = defense_judge(defense, y, 2, filler)(z)
    assert values.shape == rates.shape == (2 * G, K)
    for r in range(2 * G):
        g = r // 2
        alone = defense_objective(defense, y[g], objective, lams[r], losses[r], filler=filler[g])
        torch.testing.assert_close(values[r], alone(x[g]), **TOLERANCE)
        torch.testing.assert_close(rates[r], defense_judge(defense, y[g], 2, filler[g])(x[g]), **TOLERANCE)
    if objective == "evade_clean":  # the groups really are decided apart: their scores differ
        assert values[::2].sum(1).unique().numel() == G


SPECS = {
    "evade_clean": dict(name="apgd", threat="defense", objective="evade_clean", loss="ce+dlr", eps=0.3, steps=6,
                        lambdas=[1.0, 10.0], draws=2, random_start=False),
    "evade_bpda": dict(name="apgd", threat="defense", objective="evade_bpda", loss="ce", eps=0.3, steps=6,
                       eot_samples=2, lambdas=[0.0, 1.0], draws=2, random_start=False),
    "pgd_adaptive": dict(name="pgd", threat="defense", loss="ce+dlr", eps=0.3, step_size=0.1, steps=6, eot_samples=2,
                         draws=2, random_start=False),
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("early_stop", [False, True])
def test_groups_stacked_equal_each_group_attacked_alone(defense: DADDefense, groups: tuple[Tensor, Tensor, Tensor],
                                                        name: str, early_stop: bool) -> None:
    """APGD and PGD on three groups at once: each group's AEs are those of its attack alone (every run of the group
    stacked), for the same defense passes in a fraction of the programs; with early stops, a group either gets the
    same AEs or both are settled (every sample wrong in every draw: no batch can do better)."""
    defense.routing = "both"
    x, y, filler = groups
    spec = AttackSpec(**SPECS[name])
    with runs_settings(early_stop=early_stop), counting_passes() as alone_count:
        alone = torch.stack([run_attack(spec, defense, x[g], y[g], filler[g]) for g in range(G)])
    with runs_settings(early_stop=early_stop, stack_groups=True), counting_passes() as count:
        assert stacks_groups(spec, defense, x)
        stacked = run_attack(spec, defense, x, y, filler)
    assert stacked.shape == x.shape
    for g in range(G):
        judge = defense_judge(defense, y[g], 2, filler[g])
        if not torch.allclose(stacked[g], alone[g], **TOLERANCE):
            assert early_stop and bool((judge(stacked[g]) == 1.0).all()) and bool((judge(alone[g]) == 1.0).all())
    if not early_stop:
        torch.testing.assert_close(stacked, alone, **TOLERANCE)
        assert count.passes == alone_count.passes and count.programs * 2 < alone_count.programs


def test_groups_stack_only_where_they_fit_and_the_attack_takes_them(defense: DADDefense,
                                                                    groups: tuple[Tensor, Tensor, Tensor]) -> None:
    """By default groups stack off the CPU only; groups past the cap on images, an attack without groups (Square), a
    single group or looped runs go one group at a time; asked for a stack anyway, the attack refuses in one line."""
    x, y, filler = groups
    spec = AttackSpec(**SPECS["evade_clean"])  # four runs a group
    assert not stacks_groups(spec, defense, x) and stacks_groups(spec, defense, x.to("meta"))
    with runs_settings(max_images=4 * G * K, stack_groups=True):
        assert stacks_groups(spec, defense, x)
    with runs_settings(max_images=4 * G * K - 1, stack_groups=True):
        assert not stacks_groups(spec, defense, x)
        with pytest.raises(ValueError, match="cannot run 3 groups of 2 images as one stack"):
            run_attack(spec, defense, x, y, filler)
    square = AttackSpec(name="square", threat="defense", eps=0.3, steps=5)
    with runs_settings(stack_groups=True):
        assert not stacks_groups(square, defense, x) and not stacks_groups(spec, defense, x[:1])
        with looped_runs():
            assert not stacks_groups(spec, defense, x)
    with runs_settings(stack_groups=False):
        assert not stacks_groups(spec, defense, x.to("meta"))
