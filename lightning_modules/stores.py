"""What the defense's evaluator reads and writes outside itself: the records of each attacked batch (resumable
evaluations) and the AEs that do not depend on the defense (shared by the evaluations of one run)."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

__all__ = ["RecordStore", "CraftedAEs"]


class RecordStore(Protocol):
    """Where the evaluator keeps each batch's record (:class:`evaluation.state.AttackState`)."""

    key: str
    batches: dict[int, dict[str, Tensor]]

    def add(self, batch_idx: int, record: dict[str, Tensor]) -> None: ...

    def merge_batches(self, key: str, batches: dict[int, dict[str, Tensor]]) -> None: ...

    def per_batch(self, name: str) -> Tensor: ...


class CraftedAEs(Protocol):
    """Where AEs that do not depend on the defense are kept across evaluations
    (:class:`evaluation.crafted.CraftedStore`)."""

    def load(self, batch_idx: int, index: Tensor, like: Tensor) -> Tensor | None: ...

    def save(self, batch_idx: int, index: Tensor, x_adv: Tensor) -> None: ...
