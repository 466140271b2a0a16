"""The training stages: the classifier, the MMD-OPT kernel, the denoiser and the score model.

Each runner trains its stage's LightningModule under the stage's Trainer (:func:`pipeline.trainer.stage_trainer`),
keeps the product (best or final weights) in :class:`~pipeline.networks.RunNetworks` for the stages after, and
returns the summary that ``done.json`` records.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from torch.utils.data import DataLoader, TensorDataset

from callbacks import BatchNormRefresh, DelayedEMA, DenoiserImageLogger
from callbacks.resume import FinalCheckpoint
from dad.denoisers import UNetDenoiser
from dad.diffusion import ScoreUNet
from dad.io import atomic_torch_save
from dad.kernels import SemanticKernel
from dad.models import ImageClassifier, create_model, freeze, load_classifier_weights
from datamodules import DADDataModule
from datamodules.augment import FlipCrop
from lightning_modules.classifier import ClassifierModule
from lightning_modules.denoiser import DenoiserModule
from lightning_modules.kernel import KernelModule
from lightning_modules.score import ScoreModule
from pipeline import trainer as trainers
from pipeline.checkpoints import read_checkpoint
from pipeline.config import ConfigError, PipelineConfig
from pipeline.networks import RunNetworks
from pipeline.paths import RunPaths
from pipeline.trainer import FP32

__all__ = ["run_classifier", "run_kernel", "run_denoiser", "run_score"]

log = logging.getLogger(__name__)


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
        trainer = trainers.stage_trainer(cfg, paths, "classifier", [], max_epochs=1)
        val = trainer.validate(module, datamodule=dm, verbose=False)[0]
        if trainers.is_rank_zero():
            ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
            module.on_save_checkpoint(ckpt)
            atomic_torch_save(ckpt, paths.product("classifier"))
        nets.classifier = module.model
        return {**{k.replace("/", "_"): v for k, v in val.items() if k in ("val/acc", "val/robust_acc")},
                "weights": c.weights}
    callbacks = trainers.checkpointing(cfg, paths, "classifier", module.monitor)  # robust accuracy if adversarial
    if c.ema_decay is not None:  # validated and checkpointed with the averaged weights
        callbacks.append(DelayedEMA(c.ema_decay, c.ema_start))
    trainer = trainers.stage_trainer(cfg, paths, "classifier", callbacks, max_epochs=c.epochs)
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
    trainer = trainers.stage_trainer(cfg, paths, "classifier", [refresh], max_epochs=1)
    val = trainer.validate(module, dataloaders=dm.val_dataloader(), verbose=False)[0]
    model = freeze(module.model)
    if trainers.is_rank_zero():
        ckpt = read_checkpoint(paths.product("classifier"), "classifier")
        ckpt["state_dict"] = {**ckpt["state_dict"], **{f"model.{k}": v for k, v in model.state_dict().items()}}
        atomic_torch_save(ckpt, paths.product("classifier"))
    return {key.replace("/", "_"): value for key, value in val.items() if key in ("val/acc", "val/robust_acc")}


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
    paired = nets.paired(dm, "mmd", None, k.batch_size)  # AEs made in the Trainer's setup
    module = KernelModule(_build_kernel(cfg, nets.classifier), k, classifier=nets.classifier,
                          attack_eps=cfg.attack.eps, attack_norm=cfg.attack.norm)
    callbacks = [*trainers.checkpointing(cfg, paths, "kernel", every_n_steps=max(1, k.steps // 10)),
                 FinalCheckpoint(paths.last("kernel")), *trainers.step_bar(cfg)]
    trainer = trainers.stage_trainer(cfg, paths, "kernel", callbacks, max_steps=k.steps, max_epochs=-1,
                                     limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=paired, ckpt_path=resume, weights_only=True)
    nets.kernel = module.kernel
    clean, adv, _ = paired.triples("mmd")  # J of the trained kernel on the whole MMD set, on the run's device
    final = trainers.stage_trainer(cfg, paths, "kernel", [], **FP32)
    final.validate(module, dataloaders=DataLoader(TensorDataset(clean, adv), batch_size=len(clean)), verbose=False)
    j_start, j_end = float(module.j_start), module.j_end
    log.info("kernel: J %.3f -> %.3f over %d steps", j_start, j_end, k.steps)
    return {"j_start": j_start, "j_end": j_end, "eps": module.kernel.eps.item(),
            "sigma_phi": module.kernel.sigma_phi.item(), "sigma_q": module.kernel.sigma_q.item()}


def run_denoiser(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, nets: RunNetworks,
                 resume: str | None) -> dict[str, Any]:
    d = cfg.denoiser
    kernel = nets.kernel  # fails early (no kernel checkpoint) before any AE is made
    paired = nets.paired(dm, "denoiser", "val", d.batch_size)
    denoiser = UNetDenoiser(**{"in_channels": nets.classifier.in_channels, **d.net})
    module = DenoiserModule(nets.classifier, kernel, denoiser, d)
    monitor = "val/route_robust_acc" if d.adv_steps else "val/robust_acc"
    callbacks = [*trainers.checkpointing(cfg, paths, "denoiser", monitor), DenoiserImageLogger()]
    trainer = trainers.stage_trainer(cfg, paths, "denoiser", callbacks, max_epochs=d.epochs)
    trainer.fit(module, datamodule=paired, ckpt_path=resume, weights_only=True)
    nets.keep_best("denoiser", denoiser, "denoiser")
    summary = {f"val_{key}": float(trainer.callback_metrics.get(f"val/{key}", float("nan")))
               for key in ("robust_acc", "clean_denoised_acc")}  # the last epoch's values, except:
    summary[monitor.replace("/", "_")] = float(trainer.checkpoint_callback.best_model_score or float("nan"))
    return summary  # the monitored metric: its best, the checkpoint kept


def run_score(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, nets: RunNetworks,
              resume: str | None) -> dict[str, Any]:
    """Train the score model on the training split (never val, calibration or test), validated on ``val``."""
    s = cfg.score
    net = ScoreUNet(**{"in_channels": dm.image_shape[0], **s.net})
    module = ScoreModule(net, s)
    callbacks = trainers.checkpointing(cfg, paths, "score")  # the product is last.ckpt: the final (averaged) weights
    if s.ema_decay is not None:
        callbacks.append(DelayedEMA(s.ema_decay, s.ema_start))
    trainer = trainers.stage_trainer(cfg, paths, "score", callbacks, max_epochs=s.epochs)
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
