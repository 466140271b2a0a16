"""What the defense's evaluator reads and writes outside itself: the records of each attacked batch (resumable
evaluations) and the AEs that do not depend on the defense (shared by the evaluations of one run)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["RecordStore", "CraftedAEs", "stored_aes"]


class RecordStore(Protocol):
    """Where the evaluator keeps each batch's record (:class:`evaluation.state.AttackState`)."""

    key: str
    batches: dict[int, dict[str, Tensor]]

    def add(self, batch_idx: int, record: dict[str, Tensor]) -> None: ...

    def merge_batches(self, key: str, batches: dict[int, dict[str, Tensor]]) -> None: ...

    def per_batch(self, name: str) -> Tensor: ...


def stored_aes(store: RecordStore | None, batch_idx: int, index: Tensor, like: Tensor) -> Tensor | None:
    """The AEs ``store`` holds for batch ``batch_idx`` (samples ``index``), on ``like``'s device and dtype; None
    without a store. A store lacking them is a clear error, never a silent fresh start."""
    if store is None:
        return None
    record = store.batches.get(batch_idx)
    if record is None or not torch.equal(record["index"], index.cpu()) or record["x_adv"].numel() != like.numel():
        raise ValueError(f"Expected the stored AEs of batch {batch_idx} (to start an attack from), found none")
    return record["x_adv"].to(like)


class CraftedAEs(Protocol):
    """Where AEs that do not depend on the defense are kept across evaluations
    (:class:`evaluation.crafted.CraftedStore`)."""

    def load(self, batch_idx: int, index: Tensor, like: Tensor) -> Tensor | None: ...

    def save(self, batch_idx: int, index: Tensor, x_adv: Tensor) -> None: ...
