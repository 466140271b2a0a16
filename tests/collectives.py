"""A guard that fails every ``torch.distributed`` collective issued outside a Trainer's life.

NCCL refuses CPU tensors and gloo accepts them, so a CPU test passing says little about a GPU run: after
``trainer.fit`` returns, Lightning's teardown has moved the module back to the CPU while the process group
is still up, and any collective issued then (a torchmetrics ``compute()``, a barrier around a file write)
hands NCCL CPU tensors or runs work on the CPU that belongs on the GPU. With the guard installed, a
single-process ``strategy="ddp", devices=1`` gloo run (which syncs like a real one: torchmetrics syncs
whenever a process group exists) raises on such a collective, the way a GPU run would.

A Trainer's life runs from its DDP strategy's ``setup_environment`` to the end of its ``teardown``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from pytorch_lightning.strategies import DDPStrategy

__all__ = ["CollectiveOutsideTrainer", "COLLECTIVES", "guard_collectives"]

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
    "all_to_all", "all_to_all_single", "barrier", "monitored_barrier",
)


class CollectiveOutsideTrainer(RuntimeError):
    """A collective was issued while no Trainer's strategy was set up (after a teardown)."""


class _Life:
    """Whether a DDP strategy is between its environment setup and the end of its teardown."""

    def __init__(self) -> None:
        self.live = False
        self.violations: list[str] = []


def _guarded(name: str, original: Callable[..., Any], life: _Life) -> Callable[..., Any]:
    @functools.wraps(original)
    def collective(*args: Any, **kwargs: Any) -> Any:
        if not life.live and dist.is_initialized():
            life.violations.append(name)
            raise CollectiveOutsideTrainer(
                f"torch.distributed.{name} issued outside a Trainer's life (after its strategy's teardown): "
                "the module is back on the CPU there, and NCCL refuses CPU tensors")
        return original(*args, **kwargs)

    return collective


@contextmanager
def guard_collectives() -> Iterator[_Life]:
    """Install the guard for the duration of the block; yields the record of violations."""
    life = _Life()
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    setup_environment, teardown = DDPStrategy.setup_environment, DDPStrategy.teardown

    def live_setup(self: DDPStrategy) -> None:
        life.live = True
        setup_environment(self)

    def ending_teardown(self: DDPStrategy) -> None:
        try:
            teardown(self)
        finally:
            life.live = False

    patch(DDPStrategy, "setup_environment", live_setup)
    patch(DDPStrategy, "teardown", ending_teardown)
    for name in COLLECTIVES:
        guarded = _guarded(name, getattr(c10d, name), life)
        patch(c10d, name, guarded)  # functions of c10d call each other through the module (all_gather_object)
        patch(dist, name, guarded)
    try:
        yield life
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
