"""What every phase of one evaluation shares: the run, the defense on the run's device, the test images, the
names of its outputs (a defense file other than ``defense.pt``, or another routing, is a variant with its own
reports and states)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from callbacks.memory_format import wants_channels_last
from dad.defense import DADDefense
from dad.defense_file import load_defense
from dad.io import sha256_file
from datamodules import DADDataModule
from pipeline.config import PipelineConfig
from pipeline.paths import RunPaths
from pipeline.stages import load_datamodule
from pipeline.trainer import run_device

__all__ = ["Context", "open_context", "PROTOCOL"]

PROTOCOL = 3
"""Version of how attacks are seeded and evaluated: part of every state's key, bumped when it changes
(2: R draws per evaluation, whole-batch judged candidates; 3: batched runs, early stops on settled batches)."""

log = logging.getLogger("evaluation.context")


@dataclass
class Context:
    """What every phase of one evaluation shares."""

    cfg: PipelineConfig
    paths: RunPaths
    defense: DADDefense
    x: Tensor
    y: Tensor
    batch_size: int
    fpr_pool: Tensor
    fpr_labels: Tensor
    logger: TensorBoardLogger
    key_parts: dict[str, Any]
    variant: str
    device: torch.device  # the run's device: the Trainers attack there, the analysis between them runs there
    defense_file: str

    def output(self, name: str) -> Path:
        """``<run>/<name>`` for ``defense.pt`` under its saved routing, else ``<run>/<name>_<variant>`` (all kept)."""
        return self.paths.root / (f"{name}_{self.variant}" if self.variant else name)

    @property
    def state_dir(self) -> Path:
        return self.output("eval_state")

    def state_path(self, name: str) -> Path:
        return self.state_dir / f"{re.sub(r'[^A-Za-z0-9_.=-]', '_', name)}.pt"


def open_context(cfg: PipelineConfig, run_dir: str | Path | None = None) -> tuple[Context, DADDataModule]:
    """The evaluation's context (the defense loaded under ``eval.routing`` and placed on the run's device) and the
    run's data module."""
    paths = RunPaths(Path(run_dir) if run_dir is not None else cfg.run.dir)
    defense_file = paths.defense if cfg.eval.defense is None else paths.root / cfg.eval.defense
    defense = load_defense(defense_file, checkpoint=cfg.eval.purifier_checkpointing)
    saved_routing = defense.routing
    if cfg.eval.routing is not None:
        defense.routing = cfg.eval.routing
    variant = "_".join([defense_file.stem.removeprefix("defense_")] * (defense_file != paths.defense)
                       + [defense.routing] * (defense.routing != saved_routing))
    dm = load_datamodule(cfg, paths)
    fpr_pool, fpr_labels = dm.split_tensors("test")  # every clean test image: the FPR pool and the mixed filler
    n = len(fpr_labels) if cfg.eval.max_test is None else min(cfg.eval.max_test, len(fpr_labels))
    b = cfg.defense.batch_size
    logger = TensorBoardLogger(save_dir=str(paths.root), name="logs", version="_".join(["eval", variant]).strip("_"),
                               default_hp_metric=False)
    key_parts = {"defense": sha256_file(defense_file), "split": dm.splits.digest(), "batch_size": b,
                 "routing": defense.routing, "protocol": PROTOCOL}
    ctx = Context(cfg, paths, defense, fpr_pool[:n], fpr_labels[:n], b, fpr_pool, fpr_labels, logger, key_parts,
                  variant, run_device(cfg.trainer), defense_file.name)
    defense.to(ctx.device)
    in_memory_format(defense, cfg.eval.channels_last, fpr_pool[:2].to(ctx.device))
    return ctx, dm


def memory_format(channels_last: bool | None, device: torch.device) -> torch.memory_format:
    """The memory format of the evaluated networks under ``eval.channels_last`` (None: channels-last on a CPU)."""
    return torch.channels_last if wants_channels_last(channels_last, device) else torch.preserve_format


def in_memory_format(defense: DADDefense, channels_last: bool | None, probe: Tensor) -> None:
    """Put ``defense``'s networks in the memory format of ``eval.channels_last``; a network that cannot run in
    channels-last format (e.g. one that ``view``s its activations: a pass on the ``probe`` images fails) is put back
    in its own format, with a warning, unless channels-last was asked for explicitly."""
    fmt = memory_format(channels_last, probe.device)
    if fmt == torch.preserve_format:
        return
    defense.to(memory_format=fmt)
    try:
        with torch.no_grad():  # every network: the classifier and detector features, the purified route
            defense.classify_with_features(probe)
            defense.logits_of_runs(defense.purify_runs(probe, 1))
    except RuntimeError as error:
        if channels_last:
            raise ValueError(f"`eval.channels_last: true`, but the defense cannot run in channels-last format: {error}"
                             ) from error
        defense.to(memory_format=torch.contiguous_format)
        log.warning("the defense runs in its own memory format: in channels-last format it failed (%s)",
                    str(error).splitlines()[0])
