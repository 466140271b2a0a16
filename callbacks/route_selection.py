"""Choose the defense's purified route after its calibration, while the Trainer still holds it on its device."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from dad.purification import Purifier
from dad.route_selection import select_route

__all__ = ["RouteSelection"]

log = logging.getLogger(__name__)


class RouteSelection(Callback):
    """When a :class:`~lightning_modules.evaluator.DefenseEvaluator`'s validation ends (the defense calibrated by
    :class:`~callbacks.calibration.ThresholdCalibration` at its start), measure each candidate route on the held-out
    images (:func:`~dad.route_selection.measure_route`), keep the chosen one as the defense's purifier and
    record the choice and its evidence in ``defense.route_selection`` (saved with the defense). Every process
    measures every route with the same seeds, so all of them keep the same route.

    Args:
        routes: candidate purifiers by name (they share the defense's classifier, detectors and thresholds).
        inputs: the rest of :func:`~dad.route_selection.select_route`'s arguments (``attacks``,
            ``classifier_attack``, the selection split ``x``, ``y``, ``batch_size``, ``draws``), as
            :func:`pipeline.defense.selection_inputs` gives them.
    """

    def __init__(self, routes: Mapping[str, Purifier], **inputs: Any) -> None:
        self.routes = dict(routes)
        self.inputs = inputs

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = select_route(pl_module.defense, self.routes, **self.inputs)
        log.info("route kept: %s (worst case on %d held-out images: %s)", record["chosen"], len(self.inputs["y"]),
                 ", ".join(f"{name} {r['worst_case']:.3f}" for name, r in record["routes"].items()))
