"""The passes of the defense an attack through it makes on one batch with its whole budget spent: what the reference
loop (:func:`~dad.runs.looped_runs`) makes, one pass per EOT sample of every gradient step and per draw of every
judged candidate, the figure the evaluation reports beside what its batched runs and early stops actually ran."""

from __future__ import annotations

from dad.attacks.apgd import checkpoints
from dad.attacks.judging import judged_steps
from dad.attacks.square import judged_queries
from dad.attacks.spec import AttackSpec

__all__ = ["budget_passes"]


def budget_passes(spec: AttackSpec) -> int | None:
    """Single-draw passes of the defense one batch of ``spec`` costs in the reference loop (None: an attack on the
    classifier, or one this table does not know)."""
    if spec.threat != "defense":
        return None
    eot, draws, steps = spec.eot_samples, spec.draws, spec.steps
    if spec.name == "square":
        return (steps + 1) * eot + (1 + len(judged_queries(steps))) * draws
    runs = len(spec.losses) * len(spec.schedule) * spec.restarts
    if spec.name in ("orthogonal_pgd", "selective_pgd"):  # no penalty weights, no EOT: one pass per step
        runs = len(spec.losses) * spec.restarts
        per_run = steps + (1 + len(judged_steps(steps))) * draws
    elif spec.name == "apgd":  # the start, every step; judged: the start, the judged steps, the best points
        per_run = (steps + 1) * eot + (2 + len(judged_steps(steps) | set(checkpoints(steps)))) * draws
    elif spec.name == "pgd":
        per_run = steps * eot + (1 + len(judged_steps(steps))) * draws
    else:
        return None
    return runs * per_run + (runs + 1) * draws * (runs > 1)  # the strongest of several runs: each judged, the mix
