"""The groups of a mixed-batch attack: the clean filler of each group's batch, and the groups' AEs.

An attack of mixed batches attacks ``k`` images at a time, each group in a batch of ``B`` completed with clean
images drawn from the other test images; a group's filler and its attack are seeded by the group's own chunk. The
groups of ``k`` images (all but a shorter last one) go through an attack that takes groups as one stack of runs
(:func:`~dad.attacks.run_stack.stacks_groups`: each group still its own detector batch with its own filler),
seeded by the first group's chunk: the same attack on each group, its random draws in another order. Otherwise,
and for a shorter last group, the groups are attacked one after another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dad.attacks import AttackSpec, chunk_seed
from dad.attacks.registry import seeded
from dad.attacks.run_stack import stacks_groups

__all__ = ["FILLER_STREAM", "Group", "mixed_groups", "group_aes"]

FILLER_STREAM = 2
"""Random stream of the filler draws (0: attacks, 1: the evaluation's noise)."""

Attack = Callable[..., Tensor]
"""``attack(spec, x, y, chunk, filler=...)``: the AEs of ``x`` seeded by ``chunk``, the defense seeing ``filler`` too
(:meth:`~lightning_modules.evaluator.DefenseEvaluator.attack`)."""


@dataclass(frozen=True)
class Group:
    """One group of a mixed batch: its attacked rows of the batch, its seed's chunk and its clean filler."""

    rows: slice
    chunk: int
    filler: Tensor
    filler_y: Tensor


def mixed_groups(pool: tuple[Tensor, Tensor], index: Tensor, x: Tensor, y: Tensor, batch_size: int, fraction: float,
                 seed: int, batch_idx: int) -> list[Group]:
    """The groups of ``k = round(fraction * batch_size)`` of the test images ``x`` (at ``index`` of the split), each
    with ``batch_size - k`` filler images drawn from the other images of ``pool`` (the whole test split)."""
    pool_x, pool_y = pool
    k = min(max(1, round(fraction * batch_size)), batch_size - 1)
    others = torch.ones(len(pool_y), dtype=torch.bool)
    others[index.cpu()] = False
    candidates = others.nonzero().squeeze(1)
    groups = []
    for g, start in enumerate(range(0, len(y), k)):
        rows = slice(start, min(start + k, len(y)))
        chunk = batch_idx * 4096 + g  # one seed per group, the same on any number of processes
        with seeded(chunk_seed(seed, chunk, FILLER_STREAM), x):
            pick = candidates[torch.randperm(len(candidates))[: batch_size - (rows.stop - rows.start)]]
        groups.append(Group(rows, chunk, pool_x[pick].to(x), pool_y[pick].to(y)))
    return groups


def group_aes(spec: AttackSpec, defense: nn.Module, attack: Attack, x: Tensor, y: Tensor,
              groups: list[Group]) -> list[Tensor]:
    """Each group's AEs under ``spec``: the groups of equal size as one stack where ``spec`` takes it (see the
    module's docstring), else one group at a time; a classifier-only attack crafts its AEs alone."""
    if spec.threat != "defense":
        return [attack(spec, x[g.rows], y[g.rows], g.chunk, filler=None) for g in groups]
    size = groups[0].rows.stop - groups[0].rows.start
    full = [g for g in groups if g.rows.stop - g.rows.start == size]  # consecutive from the first row: views
    stack = x[: len(full) * size].unflatten(0, (len(full), size))
    if not stacks_groups(spec, defense, stack):
        return [attack(spec, x[g.rows], y[g.rows], g.chunk, filler=g.filler) for g in groups]
    fillers = torch.stack([g.filler for g in full])
    stacked = attack(spec, stack, y[: len(full) * size].unflatten(0, (len(full), size)), full[0].chunk,
                     filler=fillers)
    return list(stacked) + [attack(spec, x[g.rows], y[g.rows], g.chunk, filler=g.filler) for g in groups[len(full):]]
