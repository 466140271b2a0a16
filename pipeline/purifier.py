"""The purifier stage: diffusion purifiers from the trained score model, chosen on held-out data, saved as defenses.

For each kind of ``purifier.kinds`` it writes ``defense_<kind>.pt``: the run's calibrated defense (classifier,
detectors, thresholds) with the diffusion purifier as its purification path and the routing ``always`` (the
purifier alone in front of the classifier). Evaluated under a detecting routing (``eval.routing batch``) the
same file is DAD with the diffusion purifier; ``defense.pt`` under ``never`` is the classifier alone.

``t*`` and ``b`` are chosen on the validation split (:mod:`dad.diffusion.selection`) under the evaluation's
rule (an image counts only if right in all ``eval.draws`` purification runs), with the adversarial examples
the earlier stages made of it (the training attack against the classifier, from the AE cache);
SSNI's ``mu`` and ``tau`` come from the clean calibration split (``val`` when none is carved). The test split
is never read. Where ``defense.select.routes`` names a diffusion purifier, this stage makes the route choice the
defense stage left to it (every named route, on the held-out selection split) and rewrites ``defense.pt``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import Tensor

from dad.defense import DADDefense
from dad.defense_file import load_defense
from dad.diffusion import DiffusionPurifier
from dad.purification import Purifier
from dad.diffusion.selection import MAPPING_OF, select_bias, select_t_star
from dad.route_selection import select_route
from datamodules import DADDataModule
from pipeline.config import ConfigError, PipelineConfig
from pipeline.defense import route_purifier, selection_inputs
from pipeline.networks import RunNetworks
from pipeline.paths import RunPaths
from pipeline.trainer import run_device

__all__ = ["run_purifier"]

log = logging.getLogger(__name__)


def _subset(images: Tensor, size: int | None, seed: int, *others: Tensor) -> tuple[Tensor, ...]:
    """``size`` of the rows of ``images`` (and the same rows of ``others``), drawn by ``seed``; all when None."""
    if size is None or size >= len(images):
        return (images, *others)
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:size]
    return (images[keep], *(o[keep] for o in others))


def run_purifier(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, nets: RunNetworks,
                 resume: str | None) -> dict[str, Any]:
    """Choose ``t*`` (and ``b`` per SSNI mapping) on ``val``, calibrate SSNI, write ``defense_<kind>.pt``."""
    p = cfg.purifier
    if not p.kinds:
        raise ConfigError("`purifier.kinds` is empty: name the purifiers to build, e.g. "
                          "--purifier.kinds '[fixed, ssni_n, ssni_l]'")
    device = run_device(cfg.trainer)  # the selection runs outside a Trainer: on the run's device
    model, schedule = nets.score
    base = load_defense(paths.defense).to(device)  # the calibrated defense: classifier, detectors, thresholds
    classifier = base.route_classifier  # what classifies the purified images
    model, schedule = model.to(device), schedule.to(device)
    paired = nets.paired(dm, "denoiser", "val", None)
    clean, adversarial, labels = paired.triples("val")  # the denoiser stage's cache: made once
    clean, labels, adversarial = _subset(clean, p.select_size, cfg.run.seed, labels, adversarial)
    calibration = _subset(dm.split_tensors(dm.splits.calibration_split)[0], p.calibration_size, cfg.run.seed)[0]

    selection = select_t_star(classifier, model, schedule, p, (clean, labels), adversarial, cfg.run.seed,
                              cfg.eval.draws)
    t_star = selection["t_star"]
    if not selection["within_budget"]:
        log.warning("purifier: no t* of %s keeps clean validation accuracy within %.3f of the classifier's; "
                    "using the smallest", p.t_star_grid, p.max_clean_drop)
    fixed = DiffusionPurifier(model, schedule, t_star, p.sampler, p.ddim_steps)
    log.info("purifier: t* = %d (%s)", t_star, selection["candidates"][t_star])
    purifiers: dict[str, Purifier] = {"fixed": fixed}
    summary: dict[str, Any] = {"t_star": t_star, "sampler": p.sampler, "ddim_steps": p.ddim_steps,
                               "draws": cfg.eval.draws, "selection_images": len(labels),
                               "calibration_images": len(calibration), "calibration_split": dm.splits.calibration_split,
                               "fixed": selection}
    for kind in (k for k in p.kinds if k in MAPPING_OF):
        purifiers[kind], summary[kind] = select_bias(classifier, fixed, MAPPING_OF[kind], p.bias_grid, p, calibration,
                                                     (clean, labels), adversarial, cfg.run.seed, cfg.eval.draws)
        log.info("purifier: %s b = %g (%s)", kind, summary[kind]["bias"],
                 summary[kind]["candidates"][summary[kind]["bias"]])
    summary["route_selection"] = _choose_route(cfg, paths, dm, base, purifiers)
    files = {}
    for kind in p.kinds:
        files[kind] = str(paths.purified_defense(kind))
        if rank_zero_only.rank == 0:
            base.with_purifier(purifiers[kind], "always").save(files[kind])
    return {**summary, "files": files}


def _choose_route(cfg: PipelineConfig, paths: RunPaths, dm: DADDataModule, base: DADDefense,
                  purifiers: dict[str, Purifier]) -> dict[str, Any] | None:
    """Where ``defense.select.routes`` names a diffusion purifier, the choice the defense stage left to this one:
    every named route measured on the held-out selection split (:func:`~dad.route_selection.select_route`), the
    kept one written into ``defense.pt`` with the record (a single named route is kept without measuring)."""
    select = cfg.defense.select
    if not select.diffusion:
        return None
    routes = {name: purifiers[name] if name in purifiers else route_purifier(cfg, base, name)
              for name in select.routes}
    if len(routes) == 1:
        base.purifier = next(iter(routes.values())).to(base.detector.reference.device)
    else:
        select_route(base, routes, **selection_inputs(cfg, dm))
        log.info("purifier: route kept: %s", base.route_selection["chosen"])
    if rank_zero_only.rank == 0:
        base.save(paths.defense)
    return base.route_selection
