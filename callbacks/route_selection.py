"""Choose the defense's purified route after its calibration, while the Trainer still holds it on its device."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from dad.attacks import AttackSpec
from dad.purification import Purifier
from dad.route_selection import select_route

__all__ = ["RouteSelection"]

log = logging.getLogger(__name__)


class RouteSelection(Callback):
    """When a :class:`~lightning_modules.evaluator.DefenseEvaluator`'s validation ends (the defense calibrated by
    :class:`~callbacks.calibration.ThresholdCalibration` at its start), measure each candidate route on the held-out
    ``images`` (:func:`~dad.route_selection.measure_route`), keep the chosen one as the defense's purifier and
    record the choice and its evidence in ``defense.route_selection`` (saved with the defense). Every process
    measures every route with the same seeds, so all of them keep the same route.

    Args:
        routes: candidate purifiers by name (they share the defense's classifier, detectors and thresholds).
        attacks: the full-white-box attacks the routes are measured under.
        classifier_attack: a classifier-only attack breaking ties, ``(name, spec)`` (None: none).
        images, labels: the selection split.
        batch_size: the defense's batch; draws: noise draws per judgement (the evaluation's).
    """

    def __init__(self, routes: Mapping[str, Purifier], attacks: Mapping[str, AttackSpec],
                 classifier_attack: tuple[str, AttackSpec] | None, images: Tensor, labels: Tensor, batch_size: int,
                 draws: int) -> None:
        self.routes = dict(routes)
        self.attacks = dict(attacks)
        self.classifier_attack = classifier_attack
        self.images, self.labels = images, labels
        self.batch_size, self.draws = batch_size, draws

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = select_route(pl_module.defense, self.routes, self.attacks, self.classifier_attack, self.images,
                              self.labels, self.batch_size, self.draws)
        log.info("route kept: %s (worst case on %d held-out images: %s)", record["chosen"], len(self.labels),
                 ", ".join(f"{name} {r['worst_case']:.3f}" for name, r in record["routes"].items()))
