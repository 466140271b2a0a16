"""The catalogue of attacks: which function runs each ``(name, threat)`` pair, and for which norms.

An attack is a function decorated with :func:`register_attack`: ``fn(spec, model, x, y)`` for
``threat="classifier"`` (``model`` is the classifier) and ``fn(spec, defense, x, y, filler)`` for
``threat="defense"`` (``filler``: clean images the defense sees in the same batch, or None). An
:class:`~dad.attacks.spec.AttackSpec` checks its name here when it is built; :mod:`dad.attacks.registry` runs it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["AttackFn", "register_attack", "list_attacks", "check_registered", "attack_fn", "takes_groups"]

AttackFn = Callable[..., Tensor]
"""``fn(spec, target, x, y[, filler])`` -> detached AEs in [0, 1] within ``spec.eps`` of ``x``."""

_ATTACKS: dict[tuple[str, str], AttackFn] = {}
_NORMS: dict[tuple[str, str], tuple[str, ...]] = {}
_GROUPS: set[tuple[str, str]] = set()


def register_attack(name: str, threat: str, norms: tuple[str, ...] = ("linf", "l2"),
                    groups: bool = False) -> Callable[[AttackFn], AttackFn]:
    """Register ``fn`` as attack ``name`` under ``threat`` for the threat models ``norms``; ``groups``: ``fn``
    also takes independent batches stacked, ``x`` ``(G, k, ...)``, ``y`` ``(G, k)``, ``filler`` ``(G, m, ...)``,
    and returns each group's AEs (:mod:`dad.attacks.run_stack`).

    A second registration of the same pair is an error.
    """

    def decorate(fn: AttackFn) -> AttackFn:
        if (name, threat) in _ATTACKS:
            raise ValueError(f"Attack {name!r} is already registered for threat {threat!r}")
        _ATTACKS[(name, threat)] = fn
        _NORMS[(name, threat)] = norms
        if groups:
            _GROUPS.add((name, threat))
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


def attack_fn(name: str, threat: str) -> AttackFn:
    """The function registered as ``name`` under ``threat`` (see :func:`check_registered` for the error)."""
    check_registered(name, threat)
    return _ATTACKS[(name, threat)]


def takes_groups(name: str, threat: str) -> bool:
    """Whether attack ``name`` under ``threat`` takes a stack of independent batches (:func:`register_attack`)."""
    return (name, threat) in _GROUPS
