"""Train DAD: one stage or the whole pipeline.

    python train.py pipeline --config configs/digits.yaml --run.name demo
    python train.py kernel --run.name demo --kernel.lr 0.01 --ckpt_path last
    python train.py pipeline --config configs/digits.yaml --trainer.strategy ddp --trainer.devices 2
    python train.py pipeline --config configs/digits_ssni.yaml        # + the score model and diffusion purifiers
    python train.py score --config configs/digits_ssni.yaml --ckpt_path last

Flags follow LightningCLI conventions (jsonargparse): ``--config`` YAML, dotted ``--section.field``
overrides, ``--print_config``, and ``--ckpt_path last`` to resume a stage from its last checkpoint.
"""

from __future__ import annotations

import sys

from pipeline.cli import main_train

if __name__ == "__main__":
    sys.exit(main_train(sys.argv[1:]))
