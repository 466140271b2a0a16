"""Independent runs of the defense along a leading dimension: ``R`` batches at once, each its own detector batch.

An attack's restarts, penalty weights and losses are independent runs on different iterates of the same clean
batch. Here their images go through the classifier and the purifier as one tensor program of ``R x B`` images (in
chunks of at most :attr:`~dad.runs.RunSettings.max_images` images), while each run is decided as its own detector
batch of ``B`` images (its own MMD score against its own threshold, :meth:`~dad.routing.Router.decide`), never as
one batch of ``R x B``: a run sees exactly the defense a lone batch sees (a lone batch is a stack of one:
:meth:`~dad.defense.DADDefense.forward_draws`). The types a pass takes and gives live here too (:class:`KnownRows`,
:class:`DefenseOutput`; :mod:`dad.defense` re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dad.runs import record_passes, run_chunks

__all__ = ["DefenseOutput", "KnownRows", "is_runs", "per_run", "stack_rows", "classify_runs", "forward_runs"]


@dataclass
class DefenseOutput:
    """What one forward pass of the defense produced."""

    logits: Tensor  # (B, K); (draws, B, K) from DADDefense.forward_draws; (draws, R, B, K) from forward_runs
    score: Tensor  # the routing's detection statistic (see Detection), differentiable in the input
    adversarial: Tensor  # True if any image of the batch was purified
    flags: Tensor | None = None  # (B,): which images were purified


@dataclass(frozen=True)
class KnownRows:
    """Images appended to every batch an attack shows the defense, which the attack never changes (the clean filler
    of a mixed batch), with their classifier pass done once: the defense's networks treat images independently in
    eval mode, so a batch's logits and features are those of its parts."""

    images: Tensor
    logits: Tensor
    features: Tensor


def is_runs(defense: nn.Module, x: Tensor) -> bool:
    """Whether ``x`` is a stack of runs ``(R, B, *image_shape)`` rather than one batch ``(B, *image_shape)``."""
    return x.dim() == len(defense.image_shape) + 2


def per_run(rows: Tensor, runs: int) -> Tensor:
    """Rows given per group of runs, ``(G, ...)``, as rows per run, ``(runs, ...)``: a stack of runs on ``G``
    independent batches (the groups of a mixed-batch attack) is group-major, each group's rows repeated for its
    ``runs // G`` consecutive runs."""
    return rows if len(rows) == runs else rows.repeat_interleave(runs // len(rows), 0)


def stack_rows(x: Tensor, rows: Tensor | None) -> Tensor:
    """Each run's batch of the stack ``x`` ``(R, n, ...)`` followed by its ``rows`` (a clean filler): the same
    ``rows`` ``(m, ...)`` for every run, or one set per group of runs ``(G, m, ...)`` (:func:`per_run`); shape
    ``(R, n + m, ...)``; ``x`` itself without rows."""
    if rows is None:
        return x
    rows = rows.to(x)
    return torch.cat([x, per_run(rows, len(x)) if rows.dim() == x.dim() else rows.expand(len(x), *rows.shape)], 1)


def classify_runs(defense: nn.Module, x: Tensor, known: KnownRows | None = None) -> tuple[Tensor, Tensor]:
    """The classifier's logits ``(R, n (+ m), K)`` and the detector's features of the runs ``x`` ``(R, n, ...)``,
    then each run's ``known`` rows (``m`` of them, passed once for all runs); the images of a chunk of runs in
    one pass."""
    runs, n = x.shape[:2]
    parts, start = [], 0
    for size in run_chunks(runs, n, x[0, 0]):
        parts.append(defense.classify_with_features(x[start:start + size].flatten(0, 1)))
        start += size
    logits = torch.cat([p[0] for p in parts]).view(runs, n, -1)
    features = torch.cat([p[1] for p in parts])
    features = features.view(runs, n, *features.shape[1:])
    if known is None:
        return logits, features
    return stack_rows(logits, known.logits), stack_rows(features, known.features)


def forward_runs(defense: nn.Module, x: Tensor, draws: int, known: KnownRows | None = None,
                 first: int | None = None) -> DefenseOutput:
    """``draws`` independent passes of the defense on each run's batch ``cat(x[r], known.images)``, ``x`` of shape
    ``(R, n, ...)``: logits ``(draws, R, first, K)`` (the runs' ``first`` images; all by default), score ``(R,)``,
    flags ``(R, n (+ m))``. Run ``r`` gets what :meth:`~dad.defense.DADDefense.forward_draws` gives its batch
    alone; the inputs are an attack's iterates, valid by construction (not checked)."""
    if draws < 1:
        raise ValueError(f"Expected `draws` >= 1, got {draws}")
    runs, n = x.shape[:2]
    x = x.to(defense.detector.reference.dtype)
    batch = stack_rows(x, None if known is None else known.images)
    logits, features = classify_runs(defense, x, known)
    detection = defense.detect(batch, features)
    first = batch.shape[1] if first is None else first
    record_passes(draws * runs, len(run_chunks(draws, runs * first, x[0, 0])))
    flat = defense.routed_draws(batch[:, :first].flatten(0, 1), logits[:, :first].flatten(0, 1),
                                detection.flags[:, :first].flatten(), draws)
    return DefenseOutput(logits=flat.view(draws, runs, first, -1), score=detection.score,
                         adversarial=detection.flags.any(1), flags=detection.flags)
