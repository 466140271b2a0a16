"""Run the classifier stage under DDP (2 CPU processes) where one rank raises at its second step.

Usage: python failing_rank.py CONFIG_YAML FAILING_RANK
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytorch_lightning as pl

import pipeline.trainer as trainers
from pipeline.stages import run_stage
from pipeline.config import load_config


class _Fail(pl.Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == 1:
            raise RuntimeError(f"rank {self.rank} failed on purpose")


def main(config: str, rank: str) -> None:
    real = trainers.stage_trainer
    trainers.stage_trainer = lambda c, p, s, cbs, **kw: real(c, p, s, [*cbs, _Fail(int(rank))], **kw)
    cfg = load_config(config)
    cfg = replace(cfg, trainer={**cfg.trainer, "strategy": "ddp", "devices": 2})
    run_stage(cfg, "classifier")


if __name__ == "__main__":
    main(*sys.argv[1:])
