"""The one place that maps an :class:`~dad.attacks.spec.AttackSpec` to the callable that runs it.

Training AEs, the evaluation, the benchmarks and the tests all call :func:`run_attack` (or
:func:`run_seeded`, which also fixes the random state from the spec's seed and a chunk index), so the
same spec gives the same attack on every path. A new attack is one file that defines a function
decorated with :func:`~dad.attacks.catalog.register_attack`, plus its import in :mod:`dad.attacks`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from dad.attacks.catalog import attack_fn, check_registered
from dad.attacks.spec import AttackSpec

__all__ = ["run_attack", "run_seeded", "chunk_seed", "seeded", "target_of"]


def run_attack(spec: AttackSpec, target: nn.Module, x: Tensor, y: Tensor, filler: Tensor | None = None) -> Tensor:
    """Run ``spec`` on one batch: ``target`` is the classifier (threat ``classifier``) or the defense.

    ``filler``: clean images the defense sees in the same batch as ``x`` (a mixed batch); only ``x`` is
    perturbed. A classifier-only attack does not depend on the batch, so it takes none.
    """
    check_registered(spec.name, spec.threat, spec.norm)
    fn = attack_fn(spec.name, spec.threat)
    if spec.threat == "defense":
        return fn(spec, target, x, y, filler)
    if filler is not None:
        raise ValueError("A classifier-only attack does not depend on the batch: attack the images alone")
    return fn(spec, target, x, y)


def target_of(spec: AttackSpec, defense: nn.Module, source: nn.Module | None = None) -> nn.Module:
    """What ``spec`` attacks when a defense is evaluated: the defense's classifier for threat ``classifier``, the
    whole defense for threat ``defense``, or a transfer ``source`` in its place (a model, or another defense)."""
    if source is not None:
        return source
    return defense.classifier if spec.threat == "classifier" else defense


def chunk_seed(seed: int, chunk: int, stream: int = 0) -> int:
    """The seed of chunk ``chunk`` (a batch's index in its split) of an attack seeded by ``seed``.

    ``stream`` 0 seeds the attack, 1 the evaluation of its AEs: an attack never sees the noise its AEs
    are judged with.
    """
    return 2 * (seed * 1_000_003 + chunk) + stream


@contextmanager
def seeded(seed: int, like: Tensor) -> Iterator[None]:
    """Run the block with the CPU generator (and that of ``like``'s accelerator) seeded, restoring them after."""
    devices = [like.device] if like.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def run_seeded(spec: AttackSpec, target: nn.Module, x: Tensor, y: Tensor, chunk: int,
               filler: Tensor | None = None) -> Tensor:
    """:func:`run_attack` with the random state seeded by ``spec.seed`` and ``chunk`` (restored after).

    The AEs of a chunk then depend only on the spec and the chunk, not on what ran before: AE caches do
    not depend on the number of processes, and a resumed evaluation reproduces an uninterrupted one.
    """
    with seeded(chunk_seed(spec.seed, chunk), x), torch.enable_grad():
        return run_attack(spec, target, x, y, filler)
