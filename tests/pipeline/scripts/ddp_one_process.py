"""``train.py pipeline`` (every stage, score and purifiers included) and ``eval.py`` under single-process DDP.

Usage: python ddp_one_process.py pipeline CONFIG_YAML PRECISION
       python ddp_one_process.py metric_after_fit

``pipeline``: the run is ``--trainer.strategy ddp --trainer.devices 1`` (gloo, world size 1: it syncs like a
real DDP run) with :func:`tests.collectives.guard_collectives` installed, so any collective issued outside a
Trainer's life raises, as NCCL would on a GPU; exits 0 only if both commands succeed and nothing was caught.
``metric_after_fit``: the guard's own check: a torchmetrics ``compute()`` after ``fit`` returned must be caught
(exits 0 if it is).
"""

from __future__ import annotations

import sys

import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel
import torch
from torchmetrics import MeanMetric

from evaluation.cli import main_eval
from pipeline.cli import main_train
from pipeline.config import load_config
from tests.collectives import CollectiveOutsideTrainer, guard_collectives


def pipeline(config: str, precision: str) -> int:
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "1", "--trainer.precision", precision]
    run_dir = load_config(config).run.dir
    with guard_collectives() as life:
        code = main_train(["pipeline", "--config", config, *ddp])
        code = code or main_eval(["--run", str(run_dir), *ddp])
    if life.violations:
        print(f"collectives outside a Trainer's life: {life.violations}", file=sys.stderr)
        return 1
    return code


class _Counting(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.seen = MeanMetric()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.update(batch.mean())
        return super().training_step(batch, batch_idx)


def metric_after_fit() -> int:
    module = _Counting()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with guard_collectives() as life:
        trainer.fit(module)
        try:
            module.seen.compute()
        except CollectiveOutsideTrainer:
            return 0 if life.violations else 1
    return 1


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    sys.exit(pipeline(*args) if mode == "pipeline" else metric_after_fit())
