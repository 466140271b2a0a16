"""The one place that maps an :class:`~dad.attacks.spec.AttackSpec` to the callable that runs it.

Training AEs, the evaluation, the benchmarks and the tests all call :func:`run_attack` (or
:func:`run_seeded`, which also fixes the random state from the spec's seed and a chunk index), so the
same spec gives the same attack on every path. A new attack is one file that defines a function
decorated with :func:`register_attack`, plus its import in :mod:`dad.attacks`: ``fn(spec, model, x, y)``
for ``threat="classifier"`` (``model`` is the classifier) and ``fn(spec, defense, x, y, filler)`` for
``threat="defense"`` (``filler``: clean images the defense sees in the same batch, or None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from dad.attacks.spec import AttackSpec

__all__ = ["AttackFn", "register_attack", "list_attacks", "check_registered", "run_attack", "run_seeded",
           "chunk_seed", "seeded", "target_of"]

AttackFn = Callable[..., Tensor]
"""``fn(spec, target, x, y[, filler])`` -> detached AEs in [0, 1] within ``spec.eps`` of ``x``."""

_ATTACKS: dict[tuple[str, str], AttackFn] = {}
_NORMS: dict[tuple[str, str], tuple[str, ...]] = {}


def register_attack(name: str, threat: str, norms: tuple[str, ...] = ("linf", "l2")) -> Callable[[AttackFn], AttackFn]:
    """Register ``fn`` as attack ``name`` under ``threat`` for the threat models ``norms``.

    A second registration of the same pair is an error.
    """

    def decorate(fn: AttackFn) -> AttackFn:
        if (name, threat) in _ATTACKS:
            raise ValueError(f"Attack {name!r} is already registered for threat {threat!r}")
        _ATTACKS[(name, threat)] = fn
        _NORMS[(name, threat)] = norms
        return fn

    return decorate


def list_attacks() -> list[tuple[str, str]]:
    """Every registered ``(name, threat)`` pair, sorted."""
    return sorted(_ATTACKS)


def check_registered(name: str, threat: str, norm: str | None = None) -> None:
    """Raise a one-line ValueError unless ``name`` is registered under ``threat`` (and supports ``norm``)."""
    if (name, threat) not in _ATTACKS:
        names = sorted(n for n, t in _ATTACKS if t == threat)
        raise ValueError(f"Expected an attack registered for threat {threat!r} (one of {names}), got {name!r}")
    if norm is not None and norm not in _NORMS[(name, threat)]:
        raise ValueError(f"Attack {name!r} supports `norm` in {_NORMS[(name, threat)]}, got {norm!r}")


def run_attack(spec: AttackSpec, target: nn.Module, x: Tensor, y: Tensor, filler: Tensor | None = None) -> Tensor:
    """Run ``spec`` on one batch: ``target`` is the classifier (threat ``classifier``) or the defense.

    ``filler``: clean images the defense sees in the same batch as ``x`` (a mixed batch); only ``x`` is
    perturbed. A classifier-only attack does not depend on the batch, so it takes none.
    """
    check_registered(spec.name, spec.threat, spec.norm)
    fn = _ATTACKS[(spec.name, spec.threat)]
    if spec.threat == "defense":
        return fn(spec, target, x, y, filler)
    if filler is not None:
        raise ValueError("A classifier-only attack does not depend on the batch: attack the images alone")
    return fn(spec, target, x, y)


def target_of(spec: AttackSpec, defense: nn.Module, source: nn.Module | None = None) -> nn.Module:
    """What ``spec`` attacks when a defense is evaluated: the defense's classifier (or a transfer ``source``)
    for threat ``classifier``, the whole defense for threat ``defense``."""
    if spec.threat == "classifier":
        return source if source is not None else defense.classifier
    if source is not None:
        raise ValueError("Transfer attacks are crafted on the source model: use threat 'classifier'")
    return defense


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
