"""The pipeline: classifier -> AEs -> kernel -> denoiser -> calibration -> saved defense [-> score -> purifiers].

Each stage writes into ``runs/<name>/<stage>/`` (checkpoints, ``done.json`` when finished) and logs to
``runs/<name>/logs/<stage>`` (TensorBoard). A stage resumes from its ``last.ckpt`` with
``ckpt_path="last"``; :func:`run_pipeline` skips finished stages and resumes the interrupted one. Every
network is built once per process (:class:`RunNetworks`) and passed to the stages that use it; a stage
run on its own loads its inputs from the earlier stages' products. The score model and the diffusion purifiers
(:mod:`pipeline.purifier`) are part of ``train.py pipeline`` only when ``purifier.kinds`` names some.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, TensorDataset

from callbacks import BatchNormRefresh, DelayedEMA, DenoiserImageLogger, StepProgressBar, ThresholdCalibration
from callbacks.resume import FinalCheckpoint
from dad.defense import DADDefense
from dad.denoisers import UNetDenoiser
from dad.detector import MMDDetector
from dad.diffusion import DiffusionSchedule, ScoreUNet
from dad.sample_detector import SampleDetector
from dad.io import atomic_torch_save, atomic_write_json, atomic_write_text, sha256_file
from dad.kernels import SemanticKernel
from dad.models import ImageClassifier, create_model, freeze, load_classifier_weights
from dad.networks import build_networks
from datamodules import DADDataModule, PairedDataModule
from datamodules.augment import FlipCrop
from datamodules.registry import build_datamodule
from lightning_modules.classifier import ClassifierModule
from lightning_modules.denoiser import DenoiserModule
from lightning_modules.evaluator import DefenseEvaluator
from lightning_modules.kernel import KernelModule
from lightning_modules.score import ScoreModule
from pipeline.checkpoints import checkpoint_networks, load_into, read_checkpoint, sub_state_dict
from pipeline.config import ConfigError, PipelineConfig, dump_config
from pipeline.paths import PURIFICATION_STAGES, STAGES, RunPaths
from pipeline.purifier import run_purifier
from pipeline.trainer import FP32, build_trainer, run_device

__all__ = ["RunNetworks", "run_stage", "run_pipeline", "assemble_defense", "load_datamodule", "calibration_sizes"]

log = logging.getLogger(__name__)


def _hint(stage: str, cfg: PipelineConfig) -> str:
    return f"python train.py {stage} --run.name {cfg.run.name} --run.root {cfg.run.root}"


def _is_rank_zero() -> bool:
    """Whether this process is global rank 0 (known from the launcher's environment, before any Trainer)."""
    return rank_zero_only.rank == 0


class RunNetworks:
    """The networks a run's stages produce, each built or loaded once per process and shared after.

    Within one ``train.py pipeline`` the classifier trained by the first stage is the very module the
    kernel is built on and the denoiser is trained against; a stage run on its own loads what it needs
    from the earlier stages' products (each checkpoint read once).
    """

    def __init__(self, cfg: PipelineConfig, paths: RunPaths) -> None:
        self.cfg = cfg
        self.paths = paths
        self._classifier: ImageClassifier | None = None
        self._kernel: SemanticKernel | None = None
        self._denoiser: UNetDenoiser | None = None
        self._score: tuple[ScoreUNet, DiffusionSchedule] | None = None

    def _product(self, stage: str) -> dict[str, Any]:
        return read_checkpoint(self.paths.product(stage), stage, _hint(stage, self.cfg))

    @property
    def classifier(self) -> ImageClassifier:
        """The trained classifier (frozen)."""
        if self._classifier is None:
            ckpt = self._product("classifier")
            model, _, _ = build_networks(checkpoint_networks(ckpt))
            load_into(model, sub_state_dict(ckpt["state_dict"], "model"), self.paths.product("classifier"))
            self._classifier = model
        return freeze(self._classifier)

    @classifier.setter
    def classifier(self, model: ImageClassifier) -> None:
        self._classifier = model

    @property
    def classifier_hash(self) -> str:
        """SHA-256 of the classifier product (recorded by the AE caches made against it)."""
        return sha256_file(self.paths.product("classifier"))

    @property
    def kernel(self) -> SemanticKernel:
        """The trained MMD-OPT kernel (frozen); its ``phi`` is :attr:`classifier` itself when they are shared."""
        if self._kernel is None:
            ckpt = self._product("kernel")
            specs = checkpoint_networks(ckpt)
            phi_spec = specs["kernel"]["feature_extractor"]
            phi = self.classifier if phi_spec is None else build_networks({"classifier": phi_spec})[0]
            kernel = SemanticKernel(phi, train_features=specs["kernel"]["train_features"])
            load_into(kernel, sub_state_dict(ckpt["state_dict"], "kernel"), self.paths.product("kernel"))
            self._kernel = kernel
        return freeze(self._kernel)

    @kernel.setter
    def kernel(self, kernel: SemanticKernel) -> None:
        self._kernel = kernel

    @property
    def denoiser(self) -> UNetDenoiser:
        """The denoiser with the weights of the best validation epoch (frozen)."""
        if self._denoiser is None:
            ckpt = self._product("denoiser")
            _, _, denoiser = build_networks({**checkpoint_networks(ckpt), "kernel": None})
            load_into(denoiser, sub_state_dict(ckpt["state_dict"], "denoiser"), self.paths.product("denoiser"))
            self._denoiser = denoiser
        return freeze(self._denoiser)

    @property
    def score(self) -> tuple[ScoreUNet, DiffusionSchedule]:
        """The trained score network (frozen; the averaged weights when the stage averages them) and its schedule."""
        if self._score is None:
            ckpt = self._product("score")
            specs = checkpoint_networks(ckpt)
            net = ScoreUNet(**specs["score_net"])
            load_into(net, sub_state_dict(ckpt["state_dict"], "net"), self.paths.product("score"))
            self._score = (net, DiffusionSchedule(**specs["schedule"]))
        net, schedule = self._score
        return freeze(net), schedule

    @score.setter
    def score(self, trained: tuple[ScoreUNet, DiffusionSchedule]) -> None:
        self._score = trained

    def keep_best(self, stage: str, network: torch.nn.Module, prefix: str) -> None:
        """Load the weights of ``stage``'s product (its best epoch) into the just-trained ``network`` and keep it."""
        ckpt = self._product(stage)
        load_into(network, sub_state_dict(ckpt["state_dict"], prefix), self.paths.product(stage))
        setattr(self, f"_{stage}", network)


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


def _trainer(cfg: PipelineConfig, paths: RunPaths, stage: str, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    return build_trainer(cfg.trainer, str(paths.root), stage, callbacks, **kwargs)


def _step_bar(cfg: PipelineConfig) -> list[Callback]:
    """A progress bar over the steps of a stage trained for a number of steps, where progress bars are on."""
    return [StepProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []


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
    if _is_rank_zero():
        atomic_write_text(dump_config(cfg), paths.config)
        dm.save_splits(paths.splits)


def _build_classifier(cfg: PipelineConfig, dm: DADDataModule) -> ImageClassifier:
    c = cfg.classifier
    model_kwargs = {"in_channels": dm.image_shape[0], **c.model_kwargs}
    if model_kwargs["in_channels"] != dm.image_shape[0]:
        raise ConfigError(f"`classifier.model_kwargs.in_channels`={model_kwargs['in_channels']} does not match the "
                          f"data's {dm.image_shape[0]} channel(s) (images {tuple(dm.image_shape)})")
    return create_model(c.model, **{"num_classes": dm.num_classes, **model_kwargs})


def run_classifier(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, nets: RunNetworks,
                   resume: str | None) -> dict[str, Any]:
    c = cfg.classifier
    module = ClassifierModule(_build_classifier(cfg, dm), c)
    if c.weights:
        load_classifier_weights(module.model, c.weights)
        trainer = _trainer(cfg, paths, "classifier", [], max_epochs=1)
        val = trainer.validate(module, datamodule=dm, verbose=False)[0]
        if _is_rank_zero():
            ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
            module.on_save_checkpoint(ckpt)
            atomic_torch_save(ckpt, paths.product("classifier"))
        nets.classifier = module.model
        return {**{k.replace("/", "_"): v for k, v in val.items() if k in ("val/acc", "val/robust_acc")},
                "weights": c.weights}
    callbacks = _checkpointing(cfg, paths, "classifier", module.monitor)  # robust accuracy for adversarial training
    if c.ema_decay is not None:  # validated and checkpointed with the averaged weights
        callbacks.append(DelayedEMA(c.ema_decay, c.ema_start))
    trainer = _trainer(cfg, paths, "classifier", callbacks, max_epochs=c.epochs)
    train = dm.train_dataloader(augment=FlipCrop(c.crop_padding) if c.augment else None)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=dm.val_dataloader(), ckpt_path=resume,
                weights_only=True)
    fit_seconds = time.perf_counter() - start
    nets.keep_best("classifier", module.model, "model")
    best = trainer.checkpoint_callback.best_model_score
    monitored = module.monitor.replace("/", "_")
    summary = {monitored: float(best) if best is not None else None, "epochs": trainer.current_epoch,
               "train_images": train.num_samples, "fit_seconds": fit_seconds,
               "images_per_second": trainer.current_epoch * train.num_samples / fit_seconds,
               "backward_passes_per_sample": module.backward_passes_per_sample}
    if c.ema_decay is not None:
        summary |= {f"{monitored}_averaged_statistics": summary[monitored],
                    **_refresh_batch_norm(cfg, paths, dm, module)}
    return summary


def _refresh_batch_norm(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule,
                        module: ClassifierModule) -> dict[str, Any]:
    """Recompute the batch-norm statistics of the averaged weights on the training images, and keep them.

    Averaged weights are never the weights the running statistics were gathered with; one pass over the
    training images (no augmentation) in train mode gives statistics that match them, on the run's device
    (:class:`~callbacks.averaging.BatchNormRefresh`, as the validation starts).
    """
    refresh = BatchNormRefresh(DataLoader(dm.dataset("train"), batch_size=dm.batch_size))
    trainer = _trainer(cfg, paths, "classifier", [refresh], max_epochs=1)
    val = trainer.validate(module, dataloaders=dm.val_dataloader(), verbose=False)[0]
    model = freeze(module.model)
    if _is_rank_zero():
        ckpt = read_checkpoint(paths.product("classifier"), "classifier")
        ckpt["state_dict"] = {**ckpt["state_dict"], **{f"model.{k}": v for k, v in model.state_dict().items()}}
        atomic_torch_save(ckpt, paths.product("classifier"))
    return {key.replace("/", "_"): value for key, value in val.items() if key in ("val/acc", "val/robust_acc")}


def _paired(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, nets: RunNetworks, train_split: str,
            val_split: str | None, batch_size: int | None) -> PairedDataModule:
    return PairedDataModule(dm, nets.classifier, nets.classifier_hash, cfg.attack, paths.aes, train_split,
                            val_split, batch_size, cfg.data.num_workers)


def _build_kernel(cfg: PipelineConfig, classifier: ImageClassifier) -> SemanticKernel:
    k = cfg.kernel
    if k.feature_extractor:
        phi = create_model(k.feature_extractor, checkpoint_path=k.feature_extractor_ckpt, **k.feature_extractor_kwargs)
    else:  # a trained phi must not change the classifier it starts from
        phi = copy.deepcopy(classifier) if k.train_features else classifier
    if not k.train_features:
        freeze(phi)
    return SemanticKernel(phi, train_features=k.train_features, eps=k.init_eps)


def run_kernel(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, nets: RunNetworks,
               resume: str | None) -> dict[str, Any]:
    k = cfg.kernel
    paired = _paired(cfg, paths, dm, nets, "mmd", None, k.batch_size)  # AEs made in the Trainer's setup
    module = KernelModule(_build_kernel(cfg, nets.classifier), k, classifier=nets.classifier)
    callbacks = [*_checkpointing(cfg, paths, "kernel", every_n_steps=max(1, k.steps // 10)),
                 FinalCheckpoint(paths.last("kernel")), *_step_bar(cfg)]
    trainer = _trainer(cfg, paths, "kernel", callbacks, max_steps=k.steps, max_epochs=-1, limit_val_batches=0,
                       num_sanity_val_steps=0)
    trainer.fit(module, datamodule=paired, ckpt_path=resume, weights_only=True)
    nets.kernel = module.kernel
    clean, adv, _ = paired.triples("mmd")  # J of the trained kernel on the whole MMD set, on the run's device
    final = _trainer(cfg, paths, "kernel", [], **FP32)
    final.validate(module, dataloaders=DataLoader(TensorDataset(clean, adv), batch_size=len(clean)), verbose=False)
    j_start, j_end = float(module.j_start), module.j_end
    log.info("kernel: J %.3f -> %.3f over %d steps", j_start, j_end, k.steps)
    return {"j_start": j_start, "j_end": j_end, "eps": module.kernel.eps.item(),
            "sigma_phi": module.kernel.sigma_phi.item(), "sigma_q": module.kernel.sigma_q.item()}


def run_denoiser(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, nets: RunNetworks,
                 resume: str | None) -> dict[str, Any]:
    d = cfg.denoiser
    kernel = nets.kernel  # fails early (no kernel checkpoint) before any AE is made
    paired = _paired(cfg, paths, dm, nets, "denoiser", "val", d.batch_size)
    denoiser = UNetDenoiser(**{"in_channels": nets.classifier.in_channels, **d.net})
    module = DenoiserModule(nets.classifier, kernel, denoiser, d)
    monitor = "val/route_robust_acc" if d.adv_steps else "val/robust_acc"
    callbacks = [*_checkpointing(cfg, paths, "denoiser", monitor), DenoiserImageLogger()]
    trainer = _trainer(cfg, paths, "denoiser", callbacks, max_epochs=d.epochs)
    trainer.fit(module, datamodule=paired, ckpt_path=resume, weights_only=True)
    nets.keep_best("denoiser", denoiser, "denoiser")
    summary = {f"val_{key}": float(trainer.callback_metrics.get(f"val/{key}", float("nan")))
               for key in ("robust_acc", "clean_denoised_acc")}  # the last epoch's values, except:
    summary[monitor.replace("/", "_")] = float(trainer.checkpoint_callback.best_model_score or float("nan"))
    return summary  # the monitored metric: its best, the checkpoint kept


def _reference(dm: DADDataModule, size: int, seed: int) -> torch.Tensor:
    images, _ = dm.split_tensors("mmd")
    if size > len(images):
        raise ConfigError(f"`defense.reference_size`={size} exceeds the MMD set's {len(images)} images")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:size]]


def _witness_sets(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule,
                  nets: RunNetworks) -> tuple[torch.Tensor, torch.Tensor]:
    """The MMD set and its training AEs (the kernel's own, from the AE cache), or ``witness_size`` of them."""
    clean, adversarial, _ = _paired(cfg, paths, dm, nets, "mmd", None, None).triples("mmd")
    size = cfg.defense.witness_size
    if size is not None and size < len(clean):
        keep = torch.randperm(len(clean), generator=torch.Generator().manual_seed(cfg.run.seed))[:size]
        clean, adversarial = clean[keep], adversarial[keep]
    return clean, adversarial


def assemble_defense(cfg: PipelineConfig, paths: RunPaths, nets: RunNetworks, dm: DADDataModule,
                     device: torch.device | None = None) -> DADDefense:
    """The (uncalibrated) defense from the trained networks, the reference set and the witness sets, built on
    ``device`` (the detectors compute the stored sets' features as they are built)."""
    d = cfg.defense
    device = device or torch.device("cpu")
    kernel = nets.kernel.to(device)
    detector = MMDDetector(kernel, _reference(dm, d.reference_size, cfg.run.seed).to(device), d.target_fpr)
    witness = (t.to(device) for t in _witness_sets(cfg, paths, dm, nets))
    sample_detector = SampleDetector(kernel, *witness, d.sample_score, d.target_fpr)
    return DADDefense(nets.classifier.to(device), detector, nets.denoiser.to(device), cfg.denoiser.noise_std,
                      cfg.denoiser.noise, sample_detector, d.routing).eval()


def calibration_sizes(cfg: PipelineConfig, dm: DADDataModule) -> list[int]:
    """Batch sizes to calibrate: the inference size, the detection-metric sizes, the test remainder.

    :class:`~callbacks.calibration.ThresholdCalibration` keeps those its clean pool can supply.
    """
    n_test = len(dm.splits.test) if cfg.eval.max_test is None else min(cfg.eval.max_test, len(dm.splits.test))
    return sorted({cfg.defense.batch_size, *cfg.eval.detection_batch_sizes, n_test % cfg.defense.batch_size})


def run_defense(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, nets: RunNetworks,
                resume: str | None) -> dict[str, Any]:
    defense = assemble_defense(cfg, paths, nets, dm, run_device(cfg.trainer))
    clean, _ = dm.split_tensors(dm.splits.calibration_split)
    calib = ThresholdCalibration(clean, calibration_sizes(cfg, dm), cfg.defense.target_fpr,
                                 cfg.defense.calibration_batches, cfg.run.seed)
    trainer = _trainer(cfg, paths, "defense", [calib], max_epochs=1, inference_mode=False, **FP32)
    loader = DataLoader(dm.dataset("val"), batch_size=cfg.defense.batch_size)
    trainer.validate(DefenseEvaluator(defense, keep_images=False), dataloaders=loader, verbose=False)
    if _is_rank_zero():
        defense.save(paths.defense)
    return {"calibration": {str(b): r for b, r in calib.results.items()}, "sample_calibration": calib.sample_results,
            "joint_calibration": {str(b): r for b, r in calib.joint_results.items()}, "routing": defense.routing,
            "defense": str(paths.defense)}


def run_score(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, nets: RunNetworks,
              resume: str | None) -> dict[str, Any]:
    """Train the score model on the training split (never val, calibration or test), validated on ``val``."""
    s = cfg.score
    net = ScoreUNet(**{"in_channels": dm.image_shape[0], **s.net})
    module = ScoreModule(net, s)
    callbacks = _checkpointing(cfg, paths, "score")  # the product is last.ckpt: the final (averaged) weights
    if s.ema_decay is not None:
        callbacks.append(DelayedEMA(s.ema_decay, s.ema_start))
    trainer = _trainer(cfg, paths, "score", callbacks, max_epochs=s.epochs)
    train = dm.train_dataloader(augment=FlipCrop(padding=0) if s.flip else None, batch_size=s.batch_size)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=dm.val_dataloader(batch_size=s.batch_size),
                ckpt_path=resume, weights_only=True)
    fit_seconds = time.perf_counter() - start
    nets.score = (module.net, module.schedule)
    val_loss = trainer.callback_metrics.get("val/loss")
    return {"val_loss": float(val_loss) if val_loss is not None else None, "epochs": trainer.current_epoch,
            "steps": trainer.global_step, "train_images": train.num_samples, "fit_seconds": fit_seconds,
            "t_max": s.t_max, "ema_decay": s.ema_decay}


_RUNNERS = {"classifier": run_classifier, "kernel": run_kernel, "denoiser": run_denoiser, "defense": run_defense,
            "score": run_score, "purifier": run_purifier}


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
    if stage not in _RUNNERS:
        raise ConfigError(f"Unknown stage {stage!r}; expected one of {STAGES}")
    paths = RunPaths(cfg.run.dir)
    resume = _resume_path(ckpt_path, paths, stage)  # fails fast on a missing, foreign or unsafe checkpoint
    pl.seed_everything(cfg.run.seed + STAGES.index(stage), workers=True, verbose=False)
    dm = dm or load_datamodule(cfg, paths)
    _save_run_files(cfg, paths, dm)
    start = time.perf_counter()
    summary = _RUNNERS[stage](cfg, paths, dm, nets or RunNetworks(cfg, paths), resume)
    summary["seconds"] = time.perf_counter() - start
    if _is_rank_zero():
        atomic_write_json(summary, paths.done(stage))
    return summary


def run_pipeline(cfg: PipelineConfig, ckpt_path: str | None = "last") -> dict[str, dict[str, Any]]:
    """Run every unfinished stage in order; finished ones (``done.json`` present) are skipped."""
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
            continue
        dm = dm or load_datamodule(cfg, paths)
        summaries[stage] = run_stage(cfg, stage, ckpt_path, nets, dm)
    return summaries
