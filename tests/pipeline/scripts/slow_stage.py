"""Run one pipeline stage with a pause after every training step, so a test can kill it mid-epoch.

Usage: python slow_stage.py CONFIG_YAML STAGE SECONDS_PER_STEP [--resume]
"""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl

import pipeline.trainer as trainers
from pipeline.stages import run_stage
from pipeline.config import load_config


class _Pause(pl.Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)


def main(config: str, stage: str, seconds: str, *flags: str) -> None:
    real = trainers.stage_trainer
    trainers.stage_trainer = lambda c, p, s, cbs, **kw: real(c, p, s, [*cbs, _Pause(float(seconds))], **kw)
    run_stage(load_config(config), stage, ckpt_path="last" if "--resume" in flags else None)


if __name__ == "__main__":
    main(*sys.argv[1:])
