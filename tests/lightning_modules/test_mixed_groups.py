"""The groups of a mixed batch (:mod:`lightning_modules.mixed_batches`): their rows and filler, and the evaluator's
records with the groups attacked one after another or as one stack of runs (:mod:`dad.attacks.run_stack`)."""

from __future__ import annotations

import pytest
import torch

from dad.attacks import AttackSpec
from dad.defense import DADDefense
from dad.runs import runs_settings
from lightning_modules.evaluator import DefenseEvaluator
from lightning_modules.mixed_batches import mixed_groups
from dad.purification import DenoiserPurifier
from tests.conftest import tiny_defense
from tests.dad.test_run_groups import B, SPECS, TOLERANCE


@pytest.fixture(scope="module")
def defense() -> DADDefense:
    noisy = tiny_defense([B], noise_std=0.2)
    return noisy.with_purifier(DenoiserPurifier(noisy.purifier.denoiser, 0.0))


def test_mixed_groups_hold_each_image_once_among_filler_from_other_images() -> None:
    """Groups of round(fraction x B) attacked rows, the last one shorter, each with B - k filler images drawn from
    the pool outside the batch, seeded by its own chunk (the same groups again for the same seed)."""
    pool = (torch.rand(40, 1, 8, 8), torch.arange(40))
    index = torch.arange(10, 20)
    x, y = pool[0][index], pool[1][index]
    made = mixed_groups(pool, index, x, y, 8, 0.5, 3, 1)
    assert [(g.rows.start, g.rows.stop, g.chunk) for g in made] == [(0, 4, 4096), (4, 8, 4097), (8, 10, 4098)]
    for g in made:
        assert len(g.filler) == 8 - (g.rows.stop - g.rows.start)
        assert not set(g.filler_y.tolist()) & set(index.tolist()) and len(set(g.filler_y.tolist())) == len(g.filler_y)
        assert torch.equal(g.filler, pool[0][g.filler_y])
    again = mixed_groups(pool, index, x, y, 8, 0.5, 3, 1)
    assert all(torch.equal(a.filler, b.filler) for a, b in zip(made, again))


def test_the_evaluators_mixed_batches_are_the_same_with_groups_stacked(defense: DADDefense) -> None:
    """A mixed-batch evade_clean record (four groups of 2 attacked images, each among 6 filler images) is the same
    whether the groups go one after another or as one stack: AEs, per-sample results, scores and flags; the stack
    makes a fraction of the programs."""
    defense.routing = "both"
    g = torch.Generator().manual_seed(3)
    pool = (torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g))
    spec = AttackSpec(**SPECS["evade_clean"])
    evaluator = DefenseEvaluator(defense, batch_size=B, mixed={"m": (spec, 0.25)}, filler=pool, with_clean=False)
    index = torch.arange(B, 2 * B)
    records = {}
    for stack in (False, True):
        with runs_settings(early_stop=False, stack_groups=stack):
            records[stack] = evaluator.run_batch("m", pool[0][index], pool[1][index], index, 1)
    assert records[True]["batches"] == 4 and records[True]["programs"] * 2 < records[False]["programs"]
    for key in ("x_adv", "undefended", "dad", "dad_correct", "denoised", "score", "flagged", "filler_acc", "passes"):
        torch.testing.assert_close(records[True][key], records[False][key], **TOLERANCE)
