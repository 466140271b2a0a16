"""The Trainer of each stage: the user's ``--trainer.*`` arguments plus what the stage owns.

User loggers and callbacks are added to the run's own TensorBoard logger and callbacks, never in place
of them; arguments the pipeline sets per stage (:data:`~pipeline.config.OWNED_TRAINER_ARGS`) are
rejected when the configuration is built.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from callbacks import BatchesOnDevice, ChannelsLast, ResumeState, StepProgressBar
from pipeline.checkpoints import AtomicCheckpointIO
from pipeline.config import PipelineConfig, trainer_parser
from pipeline.paths import RunPaths

__all__ = ["trainer_arguments", "build_trainer", "stage_trainer", "checkpointing", "step_bar", "is_rank_zero",
           "quiet_third_party", "run_device", "FP32"]

FP32 = {"precision": "32-true"}
"""Trainer arguments of the work done in float32 whatever precision the run trains in: calibration, evaluation."""


def trainer_arguments(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """The configured Trainer arguments with their classes (callbacks, loggers, profiler ...) instantiated anew."""
    if not trainer:
        return {}
    parser = trainer_parser()
    init = parser.instantiate(parser.parse_object({"trainer": dict(trainer)}))
    return {name: init.trainer[name] for name in trainer}


def _as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build_trainer(trainer: Mapping[str, Any], root: str, log_name: str, callbacks: list[Callback],
                  **stage: Any) -> pl.Trainer:
    """A Trainer logging to ``<root>/logs/<log_name>`` (TensorBoard) with the stage's callbacks and settings.

    Args:
        trainer: the run's ``trainer`` section (see :func:`trainer_arguments`).
        root: the run directory.
        log_name: the TensorBoard version folder (the stage's name).
        callbacks: the stage's own callbacks (checkpointing included); the user's come after them.
        **stage: the arguments the stage owns (``max_epochs``, ``max_steps`` ...), which win.
    """
    user = trainer_arguments(trainer)
    loggers: list[Logger] = [TensorBoardLogger(save_dir=root, name="logs", version=log_name, default_hp_metric=False),
                             *_as_list(user.pop("logger", None))]
    own = [*callbacks, ResumeState(), BatchesOnDevice()]
    every = [*own, *_as_list(user.pop("callbacks", None))]
    plugins = [AtomicCheckpointIO(), *_as_list(user.pop("plugins", None))]
    options = {"enable_model_summary": False, **user, **stage}
    return pl.Trainer(default_root_dir=root, logger=loggers, callbacks=every, plugins=plugins,
                      use_distributed_sampler=False,  # the data modules shard by rank themselves
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in every), **options)


def stage_trainer(cfg: PipelineConfig, paths: RunPaths, stage: str, callbacks: list[Callback],
                  **kwargs: Any) -> pl.Trainer:
    """The Trainer of ``stage`` in the run ``cfg`` (:func:`build_trainer`; ``kwargs``: what the stage owns), its
    built-in networks in channels-last format where ``run.channels_last`` says so (:class:`ChannelsLast`)."""
    return build_trainer(cfg.trainer, str(paths.root), stage, [ChannelsLast(cfg.run.channels_last), *callbacks],
                         **kwargs)


def checkpointing(cfg: PipelineConfig, paths: RunPaths, stage: str, monitor: str | None = None,
                  every_n_steps: int | None = None) -> list[Callback]:
    """``best.ckpt`` (when a metric is monitored) and ``last.ckpt`` (every n steps, else every epoch)."""
    directory = str(paths.stage_dir(stage))
    last = ModelCheckpoint(dirpath=directory, filename="last", save_top_k=1, enable_version_counter=False,
                           every_n_train_steps=every_n_steps or cfg.run.checkpoint_every_n_steps)
    if monitor is None:
        return [last]
    best = ModelCheckpoint(dirpath=directory, filename="best", monitor=monitor, mode="max", save_top_k=1,
                           enable_version_counter=False)
    return [best, last]


def step_bar(cfg: PipelineConfig) -> list[Callback]:
    """A progress bar over the steps of a stage trained for a number of steps, where progress bars are on."""
    return [StepProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (known from the launcher's environment, before any Trainer)."""
    return rank_zero_only.rank == 0


def run_device(trainer: Mapping[str, Any]) -> torch.device:
    """This process's device under the run's ``trainer`` section (``cuda:<local rank>`` on GPUs), as a Trainer
    built from it would place the module: the device of work a stage does outside a Trainer's life."""
    placement = {name: value for name, value in trainer.items() if name in _PLACEMENT}
    placed = pl.Trainer(**trainer_arguments(placement), logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    return placed.strategy.root_device


_PLACEMENT = ("accelerator", "devices", "strategy", "num_nodes")
"""The Trainer arguments that decide where a process's module goes."""


DROPPED_PREFIXES = ("💡 Tip", "GPU available", "TPU available", "HPU available", "`Trainer.fit` stopped",
                    "LOCAL_RANK:", "You are using a CUDA device", "Loading `train_dataloader` to estimate")
"""Lightning's lines that :func:`quiet_third_party` drops: tips about its cloud products, accelerator and rank
banners, stop notices, and the tip to trade float32 matmul precision for speed (the statistics need float32)."""
QUIETED_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                   "lightning_fabric.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                   "pytorch_lightning.accelerators.cuda", "lightning.pytorch.accelerators.cuda")
"""The loggers those lines come from (the rank banner is logged per process by the CUDA accelerator)."""


class _DropAdvertisements(logging.Filter):
    """Drops the records that start with one of :data:`DROPPED_PREFIXES`: not ours to print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(DROPPED_PREFIXES)


def quiet_third_party() -> None:
    """Silence third-party advertisements and warnings about choices the pipeline makes on purpose."""
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).addFilter(_DropAdvertisements())
    logging.getLogger("pytorch_lightning.trainer.connectors.checkpoint_connector").setLevel(logging.WARNING)
    for pattern in (
        r".*module\(s\) in eval mode at the start of training",  # frozen classifier, phi and kernel
        r".*is smaller than the logging interval",  # the full-batch kernel stage has one batch per epoch
        r".*have no `validation_step`",  # the kernel stage trains without validation
        r".*but have no `val_dataloader`",  # the transfer source trains without validation
        r".*does not have many workers",  # in-memory tensors need no loader workers
        r".*`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of a torch API
    ):
        warnings.filterwarnings("ignore", message=pattern)
