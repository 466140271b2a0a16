"""Resumable per-attack evaluation state: what each attacked batch gave, keyed by sample index.

The idea of AutoAttack's ``EvaluationState``: a long evaluation writes its progress to disk (atomically)
and a restarted one reuses every batch already done, but only if the state's key (a hash of the
attack's full configuration, the defense file and the data) matches, so a changed attack or defense
is never mixed with stale results. Per-sample values carry the samples' indices in the test split,
so results from several processes (or resumed pieces) can be put back in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dad.io import atomic_torch_save

__all__ = ["AttackState", "state_key", "SAMPLE_FIELDS", "BATCH_FIELDS", "share_path"]

log = logging.getLogger(__name__)

_FORMAT = "dad-attack-state"
_VERSION = 3
SAMPLE_FIELDS = ("index", "x_adv", "undefended", "dad", "dad_correct", "denoised")
"""Per-sample values of a batch record: test-split index, AE, whether each predictor was right (DAD and the
denoiser path in every draw), and DAD's number of correct draws."""
BATCH_FIELDS = ("score", "flagged", "batches", "filler_acc", "seconds", "passes", "programs", "stops")
"""Per-record values: the detection statistic and the share of images purified (means over a record's mixed
batches; under batch routing the share is 0 or 1 per batch), how many defense batches the record holds (1, or
the number of mixed batches), the accuracy on the clean filler of mixed batches (NaN otherwise), the seconds
the attack took, the passes of the defense its attacks made and the programs that made them, and how many of its
defense batches' attacks stopped early (:mod:`dad.runs`)."""


def state_key(**parts: Any) -> str:
    """A short, stable hash of plain-data ``parts`` (attack configuration, file hashes, data digest)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class AttackState:
    """Records of the batches one attack has finished, under the key of what produced them.

    Attributes:
        key: see :func:`state_key`.
        batches: ``{batch_idx: record}``; a record maps :data:`SAMPLE_FIELDS` to ``(B, ...)`` tensors and
            :data:`BATCH_FIELDS` to 0-d tensors.
    """

    key: str
    batches: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    def add(self, batch_idx: int, record: dict[str, Tensor]) -> None:
        """Store one batch's record (on the CPU, detached)."""
        missing = set(SAMPLE_FIELDS + BATCH_FIELDS) - set(record)
        if missing:
            raise ValueError(f"Record of batch {batch_idx} lacks {sorted(missing)}")
        self.batches[int(batch_idx)] = {k: v.detach().cpu() for k, v in record.items()}

    def merge_batches(self, key: str, batches: dict[int, dict[str, Tensor]]) -> None:
        """Add ``batches`` (another rank's share, or a saved partial state) if they were made under this key."""
        if key == self.key:
            self.batches.update(batches)

    def to_disk(self, path: str | os.PathLike[str], rank: int | None = None) -> None:
        """Write the state atomically (a crash never leaves a truncated file).

        With ``rank``, write that rank's share beside ``path`` (:func:`share_path`), for a distributed
        evaluation interrupted before the ranks' records were merged; without it, write the whole state
        and remove the shares it supersedes.
        """
        target = Path(path) if rank is None else share_path(path, rank)
        atomic_torch_save({"format": _FORMAT, "version": _VERSION, "key": self.key, "batches": self.batches}, target)
        if rank is None:
            for share in _shares(path):
                share.unlink(missing_ok=True)

    @classmethod
    def resume(cls, path: str | os.PathLike[str], key: str) -> AttackState:
        """The saved state at ``path`` with the shares the ranks of an interrupted evaluation saved beside it."""
        state = cls.from_disk(path, key)
        for share in _shares(path):
            state.merge_batches(key, cls.from_disk(share, key).batches)
        return state

    @classmethod
    def from_disk(cls, path: str | os.PathLike[str], key: str) -> AttackState:
        """The saved state at ``path`` if it was made under ``key``, else an empty state for ``key``."""
        path = Path(path)
        if not path.is_file():
            return cls(key)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a foreign or damaged file is recomputed, never trusted
            log.warning("Ignoring unreadable evaluation state %s (%s)", path, str(err).splitlines()[0])
            return cls(key)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT or payload.get("version") != _VERSION:
            log.warning("Ignoring %s: not an evaluation state of this version", path)
            return cls(key)
        if payload.get("key") != key:
            log.info("Evaluation state %s was made by another configuration: recomputing", path)
            return cls(key)
        return cls(key, {int(b): dict(r) for b, r in payload["batches"].items()})

    def gather(self, name: str) -> Tensor:
        """A per-sample field over all finished batches, ordered by sample index."""
        if name not in SAMPLE_FIELDS:
            raise ValueError(f"Expected a per-sample field in {SAMPLE_FIELDS}, got {name!r}")
        if not self.batches:
            return torch.empty(0)
        index = torch.cat([r["index"] for r in self.batches.values()])
        values = torch.cat([r[name] for r in self.batches.values()])
        return values[index.argsort()]

    def per_batch(self, name: str) -> Tensor:
        """A per-batch field, in batch order."""
        if name not in BATCH_FIELDS:
            raise ValueError(f"Expected a per-batch field in {BATCH_FIELDS}, got {name!r}")
        return torch.stack([self.batches[b][name] for b in sorted(self.batches)]) if self.batches else torch.empty(0)


def share_path(path: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank`` saves its share of the state at ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _shares(path: str | os.PathLike[str]) -> list[Path]:
    path = Path(path)
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))
