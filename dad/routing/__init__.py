"""Which images the defense purifies: per batch, per image, both, or a fixed baseline; one router per mode.

* ``batch`` (the paper): the batch's MMD score decides for every image of the batch (:mod:`dad.routing.batch`).
* ``sample``: every image is judged alone by its per-sample score (:mod:`dad.routing.sample`).
* ``both``: a batch judged adversarial is purified whole, otherwise the images judged adversarial alone are, with
  jointly calibrated thresholds (:mod:`dad.routing.both`).
* ``never`` / ``always``: the classifier alone / every image purified (:mod:`dad.routing.fixed`).

A new mode is one :class:`~dad.routing.base.Router` subclass in its own file and one line of :data:`ROUTERS`;
the configuration's choices (:data:`Routing`), the defense, the evaluation and the reports read this registry.
"""

from typing import Literal

from dad.routing.base import TARGET_FPR, Detection, Detectors, Router, relative_excess
from dad.routing.batch import BatchRouter
from dad.routing.both import BATCH_SHARE, BothRouter, joint_thresholds
from dad.routing.fixed import AlwaysRouter, NeverRouter
from dad.routing.sample import SampleRouter

__all__ = ["ROUTERS", "Routing", "ROUTINGS", "DETECTING", "Router", "Detection", "Detectors", "relative_excess",
           "BATCH_SHARE", "TARGET_FPR", "joint_thresholds", "BothRouter"]

ROUTERS: dict[str, type[Router]] = {
    "batch": BatchRouter,
    "sample": SampleRouter,
    "both": BothRouter,
    "never": NeverRouter,
    "always": AlwaysRouter,
}
"""Every routing mode by name, in the order reports list them."""

ROUTINGS: tuple[str, ...] = tuple(ROUTERS)
Routing = Literal[ROUTINGS]  # type: ignore[valid-type]  # the configuration's choices, read off the registry
DETECTING: tuple[str, ...] = tuple(name for name, router in ROUTERS.items() if router.detecting)
"""The modes decided by the detectors (the others are fixed baselines)."""
