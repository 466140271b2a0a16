"""The assembled defense as a LightningModule: the undefended classifier and DAD, clean and under attack."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import SumMetric

from dad.attacks import AttackSpec, chunk_seed, run_seeded, target_of
from dad.attacks.registry import seeded
from dad.defense import DADDefense

__all__ = ["DefenseEvaluator", "CLEAN", "RecordStore"]

CLEAN = "clean"
_COUNTS = ("n", "undefended", "dad", "denoised", "batches", "flagged")


class RecordStore(Protocol):
    """Where the evaluator keeps each batch's record (:class:`evaluation.state.AttackState`)."""

    key: str
    batches: dict[int, dict[str, Tensor]]

    def add(self, batch_idx: int, record: dict[str, Tensor]) -> None: ...

    def merge_batches(self, key: str, batches: dict[int, dict[str, Tensor]]) -> None: ...

    def per_batch(self, name: str) -> Tensor: ...


class DefenseEvaluator(pl.LightningModule):
    """Runs the defense on clean test batches and on each configured attack.

    For every batch and every attack it records, per sample (keyed by the sample's index in the test
    split), whether the undefended classifier, DAD and the denoiser path are right, and per batch the
    detector's score and decision (``states``, one record store per name).
    The totals are torchmetrics sums, so they are exact under DDP. A batch already present in a given
    state (same batch index, same sample indices) is reused instead of attacked again: that is how an
    interrupted evaluation resumes. Validation (the defense stage) only counts the clean batches.

    Args:
        defense: the assembled :class:`~dad.defense.DADDefense`.
        attacks: named attacks.
        keep_images: keep the AEs in the states (for detection metrics on random batches and plots).
        states: the record store of every evaluated name (``clean`` too with ``with_clean``), to resume from
            and to fill; needed for testing, not for validation.
        sources: per attack name, the model a transfer attack is crafted on (moved with this module).
        with_clean: also evaluate the clean batches (under the name ``clean``).
        batch_size: the evaluation's batch size: batch indices (hence seeds and stored records) are then
            global, the same on any number of processes.
    """

    def __init__(
        self,
        defense: DADDefense,
        attacks: Mapping[str, AttackSpec] | None = None,
        keep_images: bool = True,
        states: Mapping[str, RecordStore] | None = None,
        sources: Mapping[str, nn.Module] | None = None,
        with_clean: bool = True,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.defense = defense
        self.attacks = dict(attacks or {})
        if CLEAN in self.attacks:
            raise ValueError(f"`{CLEAN}` is reserved for the clean images; rename that attack")
        self.keep_images = keep_images
        self.names = [CLEAN] * with_clean + list(self.attacks)
        # ModuleDict keys cannot hold every attack name (dots): counts and sources are stored by position
        self._slot = {name: f"m{i}" for i, name in enumerate(self.names)}
        unknown = set(sources or {}) - set(self.attacks)
        if unknown:
            raise ValueError(f"Sources given for unknown attacks {sorted(unknown)}")
        self.sources = nn.ModuleDict({self._slot[name]: model for name, model in (sources or {}).items()})
        self.counts = torch.nn.ModuleDict({f"{slot}__{key}": SumMetric() for slot in self._slot.values()
                                           for key in _COUNTS})
        self.states = dict(states or {})
        self.dirty: set[str] = set()

    def train(self, mode: bool = True) -> DefenseEvaluator:
        super().train(mode)
        self.defense.eval()
        self.sources.eval()
        return self

    @torch.no_grad()
    def _evaluate(self, x: Tensor, y: Tensor, index: Tensor) -> dict[str, Tensor]:
        """One batch through the undefended classifier, the defense (whole batch) and the denoiser path."""
        out = self.defense.forward_with_info(x)
        return {
            "index": index,
            "x_adv": x.detach() if self.keep_images else x.new_empty(0),
            "undefended": self.defense.classifier(x).argmax(1) == y,
            "dad": out.logits.argmax(1) == y,
            "denoised": self.defense.classifier(self.defense.purify(x)).argmax(1) == y,
            "score": out.score.detach().reshape(()),
            "flagged": out.adversarial.reshape(()),
        }

    def _count(self, name: str, record: dict[str, Tensor]) -> None:
        c, slot = self.counts, self._slot[name]
        c[f"{slot}__n"].update(float(record["index"].numel()))
        for key in ("undefended", "dad", "denoised"):
            c[f"{slot}__{key}"].update(record[key].sum().float().to(self.device))
        c[f"{slot}__batches"].update(1.0)
        c[f"{slot}__flagged"].update(record["flagged"].float().to(self.device))

    def attack(self, spec: AttackSpec, x: Tensor, y: Tensor, batch_idx: int,
               source: nn.Module | None = None) -> Tensor:
        """AEs of one batch under ``spec``, seeded by its seed and the batch index (:func:`~dad.attacks.run_seeded`)
        exactly as training AEs are: a classifier-threat attack targets the classifier (or ``source``)."""
        return run_seeded(spec, target_of(spec, self.defense, source), x, y, chunk=batch_idx)

    @staticmethod
    def _unpack(batch: tuple[Tensor, ...], batch_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, y, index)``; loaders without indices get consecutive ones (valid for unshuffled equal batches)."""
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        x, y = batch
        return x, y, torch.arange(len(y), device=y.device) + batch_idx * len(y)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, index = self._unpack(batch, batch_idx)
        self._count(CLEAN, self._evaluate(x, y, index))
        self.log("val/dad_clean_acc", self.results([CLEAN])[CLEAN]["dad"], batch_size=len(y))

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, index = self._unpack(batch, batch_idx)
        if self.batch_size:  # the global batch number: the same seeds and state keys on any number of ranks
            batch_idx = int(index[0]) // self.batch_size
        for name in self.names:
            state = self.states[name]
            record = state.batches.get(batch_idx)
            if record is None or not torch.equal(record["index"], index.cpu()):
                start = time.perf_counter()
                source = self.sources[self._slot[name]] if self._slot[name] in self.sources else None
                x_adv = x if name == CLEAN else self.attack(self.attacks[name], x, y, batch_idx, source)
                # the evaluation's noise (stream 1) is never the noise the attack saw (stream 0)
                seed = 0 if name == CLEAN else self.attacks[name].seed
                with seeded(chunk_seed(seed, batch_idx, stream=1), x):
                    record = self._evaluate(x_adv, y, index)
                record["seconds"] = torch.tensor(time.perf_counter() - start)
                state.add(batch_idx, record)
                self.dirty.add(name)
            self._count(name, record)

    def on_test_epoch_end(self) -> None:
        """Under DDP, give every rank the records of all ranks (each evaluated a share of the batches)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        shares: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, {name: (state.key, state.batches) for name, state in self.states.items()})
        for share in shares:
            for name, (key, batches) in share.items():
                self.states[name].merge_batches(key, batches)

    @property
    def scores(self) -> dict[str, Tensor]:
        """The detector's score of every evaluated batch, per name."""
        return {name: state.per_batch("score") for name, state in self.states.items() if state.batches}

    def results(self, names: list[str] | None = None) -> dict[str, dict[str, float]]:
        """Accuracies and the detection rate per name (``clean`` and each attack), as fractions."""
        out: dict[str, dict[str, float]] = {}
        for name in names or self.names:
            total = {key: self.counts[f"{self._slot[name]}__{key}"].compute().item() for key in _COUNTS}
            n = max(total["n"], 1.0)
            out[name] = {
                "n": int(total["n"]),
                "undefended": total["undefended"] / n,
                "dad": total["dad"] / n,
                "denoised": total["denoised"] / n,
                "detection_rate": total["flagged"] / max(total["batches"], 1.0),
                "batches": int(total["batches"]),
            }
        return out

    def configure_optimizers(self) -> Any:
        return None
