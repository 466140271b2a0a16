"""The three-stage pipeline: classifier -> AEs -> kernel -> denoiser -> calibration -> saved defense.

Each stage writes into ``runs/<name>/<stage>/`` (checkpoints, ``done.json`` when finished) and logs to
``runs/<name>/logs/<stage>`` (TensorBoard). A stage resumes from its ``last.ckpt`` with
``ckpt_path="last"``; :func:`run_pipeline` skips finished stages and resumes the interrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from callbacks import DenoiserImageLogger, ThresholdCalibration
from callbacks.resume import ResumeState
from dad.defense import DADDefense
from dad.denoisers import UNetDenoiser
from dad.detector import MMDDetector
from dad.io import atomic_torch_save, atomic_write_json, atomic_write_text, sha256_file
from dad.models import freeze, load_classifier_weights
from datamodules import DADDataModule, PairedDataModule
from datamodules.registry import build_datamodule
from lightning_modules.checkpoints import (
    STAGE_KEY, AtomicCheckpointIO, build_classifier, build_kernel, load_into, read_checkpoint, sub_state_dict,
)
from lightning_modules.classifier import ClassifierModule
from lightning_modules.config import ConfigError, PipelineConfig, dump_config
from lightning_modules.dad import DADModule
from lightning_modules.denoiser import DenoiserModule
from lightning_modules.kernel import KernelModule

__all__ = ["RunPaths", "run_stage", "run_pipeline", "assemble_defense", "STAGES"]

log = logging.getLogger(__name__)

STAGES = ("classifier", "kernel", "denoiser", "defense")


@dataclass(frozen=True)
class RunPaths:
    """Where each artefact of a run lives."""

    root: Path

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def done(self, stage: str) -> Path:
        return self.stage_dir(stage) / "done.json"

    def last(self, stage: str) -> Path:
        return self.stage_dir(stage) / "last.ckpt"

    def product(self, stage: str) -> Path:
        """The checkpoint the next stage consumes: the best classifier/denoiser, the final kernel."""
        return self.stage_dir(stage) / ("last.ckpt" if stage == "kernel" else "best.ckpt")

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def aes(self) -> Path:
        return self.root / "aes"

    @property
    def defense(self) -> Path:
        return self.root / "defense.pt"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def _hint(stage: str, cfg: PipelineConfig) -> str:
    return f"python train.py {stage} --run.name {cfg.run.name} --run.root {cfg.run.root}"


def _trainer(cfg: PipelineConfig, paths: RunPaths, stage: str, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    logger = TensorBoardLogger(save_dir=str(paths.root), name="logs", version=stage, default_hp_metric=False)
    return pl.Trainer(
        default_root_dir=str(paths.root),
        logger=logger,
        callbacks=[*callbacks, ResumeState()],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the data modules shard by rank themselves (datamodules.sampling)
        **{**cfg.trainer.kwargs(), **kwargs},
    )


def _checkpointing(cfg: PipelineConfig, paths: RunPaths, stage: str, monitor: str | None = None,
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


def _datamodule(cfg: PipelineConfig, paths: RunPaths) -> DADDataModule:
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


def _is_rank_zero() -> bool:
    """Whether this process is global rank 0 (known from the launcher's environment, before any Trainer)."""
    return rank_zero_only.rank == 0


def _save_run_files(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule) -> None:
    if _is_rank_zero():
        atomic_write_text(dump_config(cfg), paths.config)
        dm.save_splits(paths.splits)


def run_classifier(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, ckpt_path: str | None) -> dict[str, Any]:
    c = cfg.classifier
    model_kwargs = {"in_channels": dm.image_shape[0], **c.model_kwargs}
    if model_kwargs["in_channels"] != dm.image_shape[0]:
        raise ConfigError(f"`classifier.model_kwargs.in_channels`={model_kwargs['in_channels']} does not match the "
                          f"data's {dm.image_shape[0]} channel(s) (images {tuple(dm.image_shape)})")
    module = ClassifierModule(c.model, dm.num_classes, model_kwargs, c.optimizer, c.lr, c.weight_decay,
                              scheduler=c.scheduler)
    if c.weights:
        load_classifier_weights(module.model, c.weights)
        ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), STAGE_KEY: "classifier"}
        if _is_rank_zero():
            atomic_torch_save(ckpt, paths.product("classifier"))
        trainer = _trainer(cfg, paths, "classifier", [], max_epochs=1)
        val = trainer.validate(module, datamodule=dm, verbose=False)[0]
        return {"val_acc": val["val/acc"], "weights": c.weights}
    trainer = _trainer(cfg, paths, "classifier", _checkpointing(cfg, paths, "classifier", "val/acc"),
                       max_epochs=c.epochs)
    trainer.fit(module, datamodule=dm, ckpt_path=_resume_path(ckpt_path, paths, "classifier"))
    best = trainer.checkpoint_callback.best_model_score
    return {"val_acc": float(best) if best is not None else None, "epochs": trainer.current_epoch}


def _paired(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, train_split: str, val_split: str | None,
            batch_size: int | None) -> PairedDataModule:
    ckpt = paths.product("classifier")
    classifier, _ = build_classifier(ckpt, hint=_hint("classifier", cfg))
    freeze(classifier)
    return PairedDataModule(dm, classifier, sha256_file(ckpt), cfg.training_attack(), paths.aes, train_split,
                            val_split, batch_size, cfg.data.num_workers)


def run_kernel(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, ckpt_path: str | None) -> dict[str, Any]:
    k = cfg.kernel
    paired = _paired(cfg, paths, dm, "mmd", None, k.batch_size)
    module = KernelModule(str(paths.product("classifier")), k.feature_extractor, k.feature_extractor_kwargs,
                          k.feature_extractor_ckpt, k.train_features, k.lr, k.reg)
    callbacks = _checkpointing(cfg, paths, "kernel", every_n_steps=max(1, k.steps // 10))
    trainer = _trainer(cfg, paths, "kernel", callbacks, max_steps=k.steps, max_epochs=-1, limit_val_batches=0,
                       num_sanity_val_steps=0)
    trainer.fit(module, datamodule=paired, ckpt_path=_resume_path(ckpt_path, paths, "kernel"))
    trainer.save_checkpoint(paths.last("kernel"))
    clean, adv, _ = paired.triples("mmd")
    module.eval()
    j_end = module.j_on(clean.to(module.device), adv.to(module.device))
    j_start = float(module.j_start)
    log.info("kernel: J %.3f -> %.3f over %d steps", j_start, j_end, k.steps)
    return {"j_start": j_start, "j_end": j_end, "eps": module.kernel.eps.item(),
            "sigma_phi": module.kernel.sigma_phi.item(), "sigma_q": module.kernel.sigma_q.item()}


def run_denoiser(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, ckpt_path: str | None) -> dict[str, Any]:
    d = cfg.denoiser
    read_checkpoint(paths.product("kernel"), "kernel", _hint("kernel", cfg))
    paired = _paired(cfg, paths, dm, "denoiser", "val", d.batch_size)
    module = DenoiserModule(str(paths.product("classifier")), str(paths.product("kernel")), d.net, d.alpha, d.lr,
                            d.milestones, d.gamma, d.noise_std, d.noise, d.estimator)
    callbacks = [*_checkpointing(cfg, paths, "denoiser", "val/robust_acc"), DenoiserImageLogger()]
    trainer = _trainer(cfg, paths, "denoiser", callbacks, max_epochs=d.epochs)
    trainer.fit(module, datamodule=paired, ckpt_path=_resume_path(ckpt_path, paths, "denoiser"))
    return {"val_robust_acc": float(trainer.checkpoint_callback.best_model_score or float("nan")),
            "val_clean_denoised_acc": float(trainer.callback_metrics.get("val/clean_denoised_acc", float("nan")))}


def _reference(dm: DADDataModule, size: int, seed: int) -> torch.Tensor:
    images, _ = dm.split_tensors("mmd")
    if size > len(images):
        raise ConfigError(f"`defense.reference_size`={size} exceeds the MMD set's {len(images)} images")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:size]]


def assemble_defense(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule) -> DADDefense:
    """Build the (uncalibrated) defense from the three stage checkpoints and the reference set."""
    classifier, classifier_spec = build_classifier(paths.product("classifier"), _hint("classifier", cfg))
    kernel, phi_spec = build_kernel(paths.product("kernel"), classifier, _hint("kernel", cfg))
    ckpt = read_checkpoint(paths.product("denoiser"), "denoiser", _hint("denoiser", cfg))
    net = {"in_channels": classifier.in_channels, **(ckpt["hyper_parameters"].get("denoiser") or {})}
    denoiser = UNetDenoiser(**net)
    load_into(denoiser, sub_state_dict(ckpt["state_dict"], "denoiser"), paths.product("denoiser"))
    detector = MMDDetector(kernel, _reference(dm, cfg.defense.reference_size, cfg.run.seed), cfg.defense.target_fpr)
    specs = {"classifier": classifier_spec, "feature_extractor": phi_spec, "denoiser": denoiser.config}
    hp = ckpt["hyper_parameters"]
    return DADDefense(classifier, detector, denoiser, hp["noise_std"], hp["noise"], specs).eval()


def calibration_sizes(cfg: PipelineConfig, dm: DADDataModule) -> list[int]:
    """Batch sizes to calibrate: the inference size, the detection-metric sizes, the test remainder.

    :class:`~callbacks.calibration.ThresholdCalibration` keeps those its clean pool can supply.
    """
    n_test = len(dm.splits.test) if cfg.eval.max_test is None else min(cfg.eval.max_test, len(dm.splits.test))
    return sorted({cfg.defense.batch_size, *cfg.eval.detection_batch_sizes, n_test % cfg.defense.batch_size})


def run_defense(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, ckpt_path: str | None) -> dict[str, Any]:
    defense = assemble_defense(cfg, paths, dm)
    clean, _ = dm.split_tensors(dm.splits.calibration_split)
    calib = ThresholdCalibration(clean, calibration_sizes(cfg, dm), cfg.defense.target_fpr,
                                 cfg.defense.calibration_batches, cfg.run.seed)
    trainer = _trainer(cfg, paths, "defense", [calib], max_epochs=1, inference_mode=False)
    loader = DataLoader(dm.dataset("val"), batch_size=cfg.defense.batch_size)
    trainer.validate(DADModule(defense, keep_images=False), dataloaders=loader, verbose=False)
    if _is_rank_zero():
        defense.save(paths.defense)
    return {"calibration": {str(b): r for b, r in calib.results.items()}, "defense": str(paths.defense)}


_RUNNERS = {"classifier": run_classifier, "kernel": run_kernel, "denoiser": run_denoiser, "defense": run_defense}


def run_stage(cfg: PipelineConfig, stage: str, ckpt_path: str | None = None) -> dict[str, Any]:
    """Run one stage (its prerequisites must be finished) and record its summary in ``done.json``."""
    if stage not in _RUNNERS:
        raise ConfigError(f"Unknown stage {stage!r}; expected one of {STAGES}")
    paths = RunPaths(cfg.run.dir)
    _resume_path(ckpt_path, paths, stage)  # fail fast on a missing, foreign or unsafe checkpoint
    pl.seed_everything(cfg.run.seed + STAGES.index(stage), workers=True, verbose=False)
    dm = _datamodule(cfg, paths)
    _save_run_files(cfg, paths, dm)
    start = time.perf_counter()
    summary = _RUNNERS[stage](cfg, paths, dm, ckpt_path)
    summary["seconds"] = time.perf_counter() - start
    if _is_rank_zero():
        atomic_write_json(summary, paths.done(stage))
    return summary


def run_pipeline(cfg: PipelineConfig, ckpt_path: str | None = "last") -> dict[str, dict[str, Any]]:
    """Run every unfinished stage in order; finished ones (``done.json`` present) are skipped."""
    paths = RunPaths(cfg.run.dir)
    summaries: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        done = paths.done(stage)
        if done.is_file() and (stage == "defense" or paths.product(stage).is_file()):
            log.info("%s: finished earlier, skipping (%s)", stage, done)
            summaries[stage] = json.loads(done.read_text())
            continue
        summaries[stage] = run_stage(cfg, stage, ckpt_path)
    return summaries
