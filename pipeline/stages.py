"""The pipeline: classifier -> AEs -> kernel -> denoiser -> calibration -> saved defense [-> score -> purifiers].

Each stage writes into ``runs/<name>/<stage>/`` (checkpoints, ``done.json`` when finished) and logs to
``runs/<name>/logs/<stage>`` (TensorBoard). A stage resumes from its ``last.ckpt`` with
``ckpt_path="last"``; :func:`run_pipeline` skips finished stages and resumes the interrupted one. Every
network is built once per process (:class:`~pipeline.networks.RunNetworks`) and passed to the stages that use it;
a stage run on its own loads its inputs from the earlier stages' products. The runners live in
:mod:`pipeline.training`, :mod:`pipeline.defense` and :mod:`pipeline.purifier` (the score model and the diffusion
purifiers are part of ``train.py pipeline`` only when ``purifier.kinds`` names some).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from dad.io import atomic_write_json, atomic_write_text
from datamodules import DADDataModule
from datamodules.registry import build_datamodule
from pipeline import trainer as trainers
from pipeline.checkpoints import read_checkpoint
from pipeline.config import ConfigError, PipelineConfig, dump_config
from pipeline.defense import run_defense
from pipeline.networks import RunNetworks
from pipeline.paths import PURIFICATION_STAGES, STAGES, RunPaths
from pipeline.purifier import run_purifier
from pipeline.training import run_classifier, run_denoiser, run_kernel, run_score

__all__ = ["run_stage", "run_pipeline", "load_datamodule", "RUNNERS"]

log = logging.getLogger(__name__)


def _resume_path(ckpt_path: str | None, paths: RunPaths, stage: str) -> str | None:
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = paths.last(stage)
        if last.is_file():
            read_checkpoint(last, stage)
            return str(last)
        log.info("No %s to resume from: starting the %s stage from scratch", last, stage)
        return None
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"--ckpt_path {ckpt_path} does not exist (use 'last' to resume the run's own checkpoint)")
    read_checkpoint(ckpt_path, stage)
    return ckpt_path


def load_datamodule(cfg: PipelineConfig, paths: RunPaths) -> DADDataModule:
    """The run's data module, set up; fails if its split differs from the one the run started with."""
    dm = build_datamodule(cfg.data, cfg.run.seed)
    dm.setup()
    if paths.splits.is_file():
        saved = json.loads(paths.splits.read_text())
        if saved.get("digest") != dm.splits.digest():
            raise ConfigError(
                f"The data split differs from the one saved in {paths.splits}: the data or `data.*`/`run.seed` "
                "changed since this run started; use a new --run.name"
            )
    return dm


def _save_run_files(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule) -> None:
    if trainers.is_rank_zero():
        atomic_write_text(dump_config(cfg), paths.config)
        dm.save_splits(paths.splits)


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "classifier": run_classifier, "kernel": run_kernel, "denoiser": run_denoiser, "defense": run_defense,
    "score": run_score, "purifier": run_purifier,
}
"""The runner of each stage: ``runner(cfg, paths, datamodule, networks, resume) -> summary``."""


def run_stage(cfg: PipelineConfig, stage: str, ckpt_path: str | None = None, nets: RunNetworks | None = None,
              dm: DADDataModule | None = None) -> dict[str, Any]:
    """Run one stage (its prerequisites must be finished) and record its summary in ``done.json``.

    Args:
        cfg: the run's configuration.
        stage: one of :data:`~pipeline.paths.STAGES`.
        ckpt_path: ``"last"`` resumes the stage from its last checkpoint; a path resumes from that file.
        nets: the networks built so far in this process (:func:`run_pipeline` shares them across stages).
        dm: the run's data module, if this process has it already (decoded images are reused).
    """
    if stage not in RUNNERS:
        raise ConfigError(f"Unknown stage {stage!r}; expected one of {STAGES}")
    paths = RunPaths(cfg.run.dir)
    resume = _resume_path(ckpt_path, paths, stage)  # fails fast on a missing, foreign or unsafe checkpoint
    pl.seed_everything(cfg.run.seed + STAGES.index(stage), workers=True, verbose=False)
    dm = dm or load_datamodule(cfg, paths)
    _save_run_files(cfg, paths, dm)
    start = time.perf_counter()
    summary = RUNNERS[stage](cfg, paths, dm, nets or RunNetworks(cfg, paths), resume)
    summary["seconds"] = time.perf_counter() - start
    if trainers.is_rank_zero():
        atomic_write_json(summary, paths.done(stage))
    return summary


def run_pipeline(cfg: PipelineConfig, ckpt_path: str | None = "last",
                 until: str | None = None) -> dict[str, dict[str, Any]]:
    """Run every unfinished stage in order, up to ``until`` (included; None: every stage); finished ones
    (``done.json`` present) are skipped."""
    if until is not None and until not in STAGES:
        raise ValueError(f"Expected `until` among {STAGES}, got {until!r}")
    paths = RunPaths(cfg.run.dir)
    nets = RunNetworks(cfg, paths)
    dm: DADDataModule | None = None
    summaries: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        if stage in PURIFICATION_STAGES and not cfg.purifier.kinds:
            continue
        done = paths.done(stage)
        if done.is_file() and (stage in ("defense", "purifier") or paths.product(stage).is_file()):
            log.info("%s: finished earlier, skipping (%s)", stage, done)
            summaries[stage] = json.loads(done.read_text())
        else:
            dm = dm or load_datamodule(cfg, paths)
            summaries[stage] = run_stage(cfg, stage, ckpt_path, nets, dm)
        if stage == until:
            break
    return summaries
