"""Independent runs of a random computation: along a leading dimension of one tensor program, or one after another.

The EOT samples of an attack's objective, the noise draws of a judged batch, the purifications of a flagged batch
and an attack's runs (its losses, penalty weights and restarts: :mod:`dad.attacks.run_stack`, each run its own
detector batch, :mod:`dad.defense_runs`) are independent runs of the same computation. Batched (the default), they
go through the networks as one batch of at most :attr:`RunSettings.max_images` images (a memory cap: more runs go in
chunks), the deterministic part (the classifier's pass on the batch, the detectors) computed once, and an attack
stops on a batch once every sample is wrong in every draw of its judge (:attr:`RunSettings.early_stop`).
:func:`looped_runs` switches back to the reference: one call per run and every budget spent, what the batched
programs are tested and timed against (``python -m bench.attack_speed``). On the CPU both draw the same random
numbers in the same order where a run's noise has a multiple of 16 elements (the images of every dataset here), so
their values agree up to the order of floating-point sums; chunks draw the same numbers as one batch.

:func:`counting_passes` counts what the defense ran: ``passes`` (single-draw evaluations of the defense, what the
loop makes) and ``programs`` (the tensor programs that made them: one per chunk of batched runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["CPU_PASS_ELEMENTS", "RunSettings", "run_settings", "runs_settings", "looped_runs", "run_chunks",
           "PassCount", "counting_passes", "record_passes", "record_stop"]


CPU_PASS_ELEMENTS = 200 * 3 * 32 * 32
"""Image elements (images x channels x pixels) one network pass takes on a CPU when no cap is configured: two
CIFAR-10 batches of 100. Larger passes cost more per image there (purify and classify, forward and backward, 1 thread
of an AMD EPYC: 2.3 / 3.1 / 3.8 / 3.6 / 6.8 ms per CIFAR-10 image at 50 / 100 / 200 / 400 / 800 images a pass; four
stacked runs of evade_bpda, 800 images a pass, took 2.5x the time of the same runs one after another), while small
images keep every gain of batching (digits: 9,600 images a pass). An accelerator takes all runs at once."""


@dataclass(frozen=True)
class RunSettings:
    """How independent runs execute.

    Attributes:
        batched: runs along a leading dimension (True) or one call each (False).
        max_images: the most images one network pass takes (runs times images per run); None: no cap on an
            accelerator, :data:`CPU_PASS_ELEMENTS` worth of images on a CPU.
        early_stop: an attack stops on a batch once its judge finds every sample wrong in every draw.
        stack_groups: the groups of a mixed-batch attack go through the attack as one stack of runs
            (:func:`~dad.attacks.run_stack.stacks_groups`); None: off the CPU only. A stack runs until every group
            is settled, so on a CPU, where the work is compute-bound, one group after another with its own early
            stop is faster (the digits demo's mixed ``evade_clean``, 2 batches on 2 threads of an AMD EPYC: 8.5 s
            one after another, 10.4 s stacked, 5 programs a group instead of 31 but 1.8x the passes).
    """

    batched: bool = True
    max_images: int | None = None
    early_stop: bool = True
    stack_groups: bool | None = None

    def __post_init__(self) -> None:
        if self.max_images is not None and (isinstance(self.max_images, bool) or self.max_images < 1):
            raise ValueError(f"Expected `max_images` >= 1 or None, got {self.max_images!r}")


_SETTINGS: ContextVar[RunSettings] = ContextVar("run_settings", default=RunSettings())


def run_settings() -> RunSettings:
    """The settings in force (the defaults outside :func:`runs_settings` blocks)."""
    return _SETTINGS.get()


@contextmanager
def runs_settings(**changes: Any) -> Iterator[RunSettings]:
    """Run the block with some :class:`RunSettings` fields changed (e.g. ``max_images=4096``)."""
    token = _SETTINGS.set(replace(_SETTINGS.get(), **changes))
    try:
        yield _SETTINGS.get()
    finally:
        _SETTINGS.reset(token)


@contextmanager
def looped_runs() -> Iterator[RunSettings]:
    """Run the block with the reference implementation: runs one after another, every budget spent."""
    with runs_settings(batched=False, early_stop=False) as settings:
        yield settings


def run_chunks(count: int, images_per_run: int, image: Tensor | None = None) -> list[int]:
    """How many runs each pass takes: ``count`` runs in chunks of at most ``max_images`` images (at least one run a
    chunk); without a cap, one chunk of ``count`` (on a CPU, chunks of :data:`CPU_PASS_ELEMENTS` elements, given one
    ``image`` of the runs: its size and device); ``count`` chunks of one when looped.

    >>> with runs_settings(max_images=100):
    ...     run_chunks(5, 40)
    [2, 2, 1]
    """
    settings = run_settings()
    if not settings.batched:
        return [1] * count
    cap = settings.max_images
    if cap is None and image is not None and image.device.type == "cpu":
        cap = max(1, CPU_PASS_ELEMENTS // max(image.numel(), 1))
    per_chunk = count if cap is None else max(1, cap // max(images_per_run, 1))
    return [min(per_chunk, count - start) for start in range(0, count, per_chunk)]


@dataclass
class PassCount:
    """What the defense ran inside a :func:`counting_passes` block, and how often an attack stopped early."""

    passes: int = 0
    programs: int = 0
    stops: int = 0


_COUNT: ContextVar[PassCount | None] = ContextVar("pass_count", default=None)


@contextmanager
def counting_passes() -> Iterator[PassCount]:
    """Count the defense's passes and programs in the block (nested blocks count for themselves only)."""
    count = PassCount()
    token = _COUNT.set(count)
    try:
        yield count
    finally:
        _COUNT.reset(token)


def record_passes(passes: int, programs: int) -> None:
    """Add to the count of the enclosing :func:`counting_passes` block, if any."""
    count = _COUNT.get()
    if count is not None:
        count.passes += passes
        count.programs += programs


def record_stop() -> None:
    """Count an early stop in the enclosing :func:`counting_passes` block, if any."""
    count = _COUNT.get()
    if count is not None:
        count.stops += 1
