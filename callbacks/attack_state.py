"""Save an evaluation's per-attack records as it goes, so an interrupted evaluation resumes."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

__all__ = ["AttackStateWriter"]


class AttackStateWriter(Callback):
    """Writes the record stores a :class:`~lightning_modules.evaluator.DefenseEvaluator` changed (its ``dirty``
    names), atomically, every ``interval_s``, at the end and when the run is interrupted by an exception
    (Ctrl-C included).

    In a single process, or once the ranks' records are merged (at the end of testing), rank 0 writes each
    whole state; otherwise every rank writes its own share beside it (merged when the evaluation resumes).

    Args:
        paths: the file of each name's state.
        interval_s: minimum seconds between two writes during the run.
    """

    def __init__(self, paths: Mapping[str, Path], interval_s: float = 30.0) -> None:
        self.paths = dict(paths)
        self.interval_s = interval_s
        self._last = time.monotonic()

    def _flush(self, trainer: pl.Trainer, module: Any, merged: bool = False) -> None:
        for name in sorted(module.dirty):
            state = module.states[name]
            if merged or trainer.world_size == 1:
                if trainer.is_global_zero:
                    state.to_disk(self.paths[name])
            else:
                state.to_disk(self.paths[name], rank=trainer.global_rank)
        module.dirty.clear()
        self._last = time.monotonic()

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if time.monotonic() - self._last >= self.interval_s:
            self._flush(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, pl_module, merged=True)  # the evaluator merged the ranks' records at epoch end

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._flush(trainer, pl_module)  # an interrupted evaluation keeps every finished batch
