"""The defense stage: the trained networks assembled with the reference and witness sets, calibrated, saved."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from callbacks import RouteSelection, ThresholdCalibration
from dad.defense import DADDefense
from dad.detector import MMDDetector
from dad.models import freeze
from dad.purification import DenoiserPurifier, IdentityPurifier, Purifier
from dad.sample_detector import SampleDetector
from datamodules import DADDataModule
from lightning_modules.evaluator import DefenseEvaluator
from pipeline import trainer as trainers
from pipeline.config import ConfigError, PipelineConfig
from pipeline.networks import RunNetworks, load_classifier, load_denoiser
from pipeline.paths import RunPaths
from pipeline.trainer import FP32, run_device

__all__ = ["assemble_defense", "calibration_sizes", "route_purifier", "route_selection", "run_defense",
           "selection_inputs"]

log = logging.getLogger(__name__)


def _reference(dm: DADDataModule, size: int, seed: int) -> torch.Tensor:
    images, _ = dm.split_tensors("mmd")
    if size > len(images):
        raise ConfigError(f"`defense.reference_size`={size} exceeds the MMD set's {len(images)} images")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:size]]


def _witness_sets(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule,
                  nets: RunNetworks) -> tuple[torch.Tensor, torch.Tensor]:
    """The MMD set and its training AEs (the kernel's own, from the AE cache), or ``witness_size`` of them."""
    clean, adversarial, _ = nets.paired(dm, "mmd", None, None).triples("mmd")
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
    kernel = nets.kernel.to(device).eval()  # a trained phi's batch norm must not see the stored sets as a batch
    detector = MMDDetector(kernel, _reference(dm, d.reference_size, cfg.run.seed).to(device))
    witness = (t.to(device) for t in _witness_sets(cfg, paths, dm, nets))
    sample_detector = SampleDetector(kernel, *witness, d.sample_score)
    purifier = DenoiserPurifier(nets.denoiser.to(device), cfg.denoiser.noise_std, cfg.denoiser.noise)
    classifier = nets.classifier.to(device)
    flagged = None
    if d.flagged_classifier is not None:
        flagged = _flagged_classifier(Path(d.flagged_classifier), classifier, detector.reference[:2])
    return DADDefense(classifier, detector, purifier, sample_detector=sample_detector, routing=d.routing,
                      target_fpr=d.target_fpr, flagged_classifier=flagged).eval()


def _flagged_classifier(path: Path, classifier: nn.Module, images: torch.Tensor) -> nn.Module:
    """``defense.flagged_classifier``'s network on ``images``' device, frozen, checked against the run's classifier:
    the same images in, the same classes out."""
    flagged = freeze(load_classifier(path, "")).to(images.device)  # another run's: no command of this run makes it
    with torch.no_grad():
        try:
            found, expected = flagged(images).shape, classifier(images).shape
        except RuntimeError as err:
            raise ConfigError(f"`defense.flagged_classifier` {path} does not take this run's images: "
                              f"{str(err).splitlines()[0]}") from None
    if found != expected:
        raise ConfigError(f"`defense.flagged_classifier` {path} gives {found[1]} classes, this run's classifier "
                          f"{expected[1]}")
    return flagged


def calibration_sizes(cfg: PipelineConfig, dm: DADDataModule) -> list[int]:
    """Batch sizes to calibrate: the inference size, the detection-metric sizes, the test remainder.

    :class:`~callbacks.calibration.ThresholdCalibration` keeps those its clean pool can supply.
    """
    n_test = len(dm.splits.test) if cfg.eval.max_test is None else min(cfg.eval.max_test, len(dm.splits.test))
    return sorted({cfg.defense.batch_size, *cfg.eval.detection_batch_sizes, n_test % cfg.defense.batch_size})


def route_purifier(cfg: PipelineConfig, defense: DADDefense, name: str) -> Purifier:
    """The purifier of the route ``name``: the run's denoiser (``denoiser``), none: the backbone alone
    (``identity``), or another run's denoiser (``defense.select.denoisers``)."""
    if name == "denoiser":
        return defense.purifier
    if name == "identity":
        return IdentityPurifier()
    denoiser = load_denoiser(Path(cfg.defense.select.denoisers[name]), "")  # another run's: no command here makes it
    return DenoiserPurifier(denoiser, cfg.denoiser.noise_std, cfg.denoiser.noise)


def selection_inputs(cfg: PipelineConfig, dm: DADDataModule) -> dict[str, Any]:
    """What a route selection is measured with: the attacks, the classifier-only tie-breaker, the held-out split,
    the defense's batch and the evaluation's draws (the keyword arguments of
    :func:`~dad.route_selection.select_route` but the defense and the routes)."""
    select = cfg.defense.select
    only = select.classifier_attack
    images, labels = dm.split_tensors("selection")
    return {"attacks": {name: cfg.eval.attacks[name] for name in select.attack_names(cfg.eval.attacks)},
            "classifier_attack": None if only is None else (only, cfg.eval.attacks[only]), "x": images, "y": labels,
            "batch_size": cfg.defense.batch_size, "draws": cfg.eval.draws}


def route_selection(cfg: PipelineConfig, dm: DADDataModule, defense: DADDefense) -> list[RouteSelection]:
    """The callback choosing the defense's route among ``defense.select.routes``; none when fewer than two routes
    are named (:func:`run_defense` keeps a single one as it is) or when a diffusion purifier is among them (the
    purifier stage builds those, and chooses)."""
    select = cfg.defense.select
    if select.diffusion:
        log.info("defense: the route among %s is chosen by the purifier stage (it builds %s)", select.routes,
                 select.diffusion)
    if len(select.routes) < 2 or select.diffusion:
        return []
    return [RouteSelection({name: route_purifier(cfg, defense, name) for name in select.routes},
                           **selection_inputs(cfg, dm))]


def run_defense(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, nets: RunNetworks,
                resume: str | None) -> dict[str, Any]:
    """Assemble and calibrate the defense (and choose its route where ``defense.select`` names routes), save it,
    and return what ``done.json`` records."""
    defense = assemble_defense(cfg, paths, nets, dm, run_device(cfg.trainer))
    select = cfg.defense.select
    if len(select.routes) == 1 and not select.diffusion:  # one route named: nothing to choose
        defense.purifier = route_purifier(cfg, defense, select.routes[0]).to(defense.detector.reference.device)
    clean, _ = dm.split_tensors(dm.splits.calibration_split)
    calib = ThresholdCalibration(clean, calibration_sizes(cfg, dm), cfg.defense.target_fpr,
                                 cfg.defense.calibration_batches, cfg.run.seed)
    callbacks = [calib, *route_selection(cfg, dm, defense)]
    trainer = trainers.stage_trainer(cfg, paths, "defense", callbacks, max_epochs=1, inference_mode=False, **FP32)
    loader = DataLoader(dm.dataset("val"), batch_size=cfg.defense.batch_size)
    trainer.validate(DefenseEvaluator(defense, keep_images=False), dataloaders=loader, verbose=False)
    if trainers.is_rank_zero():
        defense.save(paths.defense)
    results = calib.results
    return {"calibration": {str(b): r for b, r in results.get("batch", {}).items()},
            "sample_calibration": results.get("sample", {}),
            "joint_calibration": {str(b): r for b, r in results.get("both", {}).items()}, "routing": defense.routing,
            "route_selection": defense.route_selection, "flagged_classifier": cfg.defense.flagged_classifier,
            "defense": str(paths.defense)}
