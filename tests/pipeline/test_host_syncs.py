"""A training step reads nothing back to the host: on a GPU such a read waits for the device to finish and the
host can no longer queue work ahead (the classifier stage ran at 0.32 of a bare loop on one H200).

On the CPU there is no device to wait for, so reads are counted instead: a
:class:`~torch.overrides.TorchFunctionMode` sees every ``.item()``, ``.tolist()``, ``bool()`` / ``int()`` /
``float()`` of a tensor, ``nonzero`` and boolean-mask indexing, wherever they happen (our code, Lightning,
torchmetrics), from the start of one training step to the start of the next. Reads of tensors that live in host
memory by construction are left out: an optimizer's step counts (``torch.optim`` keeps them on the host unless
``capturable``) and a data loader's sampling order (``torch.utils.data``, :mod:`datamodules.sampling`).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode

import pipeline.trainer as trainers
from pipeline.stages import run_stage
from tests.conftest import tiny_config

HOST_SIDE = (str(Path(torch.optim.__file__).parent), str(Path(torch.utils.data.__file__).parent),
             str(Path(__file__).resolve().parents[2] / "datamodules" / "sampling.py"))
READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
                   "masked_select", "unique", "numpy", "equal", "is_nonzero"})


class HostReads(TorchFunctionMode):
    """Records every tensor operation that copies a value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if sys._getframe(1).f_code.co_filename.startswith(HOST_SIDE):
            pass
        elif name in READS:
            self.seen.append(name)
        elif name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:]):
            self.seen.append("boolean mask")
        return func(*args, **(kwargs or {}))


class ReadsPerStep(pl.Callback):
    """The host reads of each training step (start to next start); steps that ran a validation are left out."""

    def __init__(self) -> None:
        self.mode: HostReads | None = None
        self.steps: list[list[str]] = []
        self._validated = False

    def _close(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            if not self._validated:
                self.steps.append(self.mode.seen)
        self.mode, self._validated = None, False

    def on_train_batch_start(self, *args: Any) -> None:
        self._close()
        self.mode = HostReads()
        self.mode.__enter__()

    def on_validation_start(self, *args: Any) -> None:
        self._validated = True

    def on_train_end(self, *args: Any) -> None:
        self._close()


@pytest.mark.parametrize("stage", ["classifier", "kernel", "denoiser"])
def test_training_steps_read_nothing_back_to_the_host(stage: str, tmp_path, monkeypatch) -> None:
    cfg = tiny_config(tmp_path)
    recipe = replace(cfg.classifier, optimizer="sgd", lr=0.05, scheduler="onecycle", label_smoothing=0.1,
                     augment=True, crop_padding=1, ema_decay=0.9, ema_start=0.0, channels_last=True, epochs=2)
    cfg = replace(cfg, classifier=recipe, kernel=replace(cfg.kernel, steps=10),
                  denoiser=replace(cfg.denoiser, epochs=2),
                  trainer={**cfg.trainer, "enable_progress_bar": True, "log_every_n_steps": 1000})
    for earlier in ("classifier", "kernel")[: ("classifier", "kernel", "denoiser").index(stage)]:
        run_stage(cfg, earlier)
    counter = ReadsPerStep()
    real = trainers.stage_trainer
    monkeypatch.setattr(trainers, "stage_trainer",
                        lambda c, p, name, cbs, **kw: real(c, p, name, [*cbs, counter], **kw))
    run_stage(cfg, stage)
    steady = counter.steps[2:]  # the first steps may read once (lazy initialisation)
    assert len(steady) >= 5
    assert [reads for reads in steady if reads] == []
