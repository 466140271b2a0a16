"""``sample``: every image is judged alone by its per-sample score (:mod:`dad.sample_detector`); batches of one are
allowed, and nothing an attacker does to other images changes an image's route."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dad.routing.base import Detection, Detectors, Router, relative_excess
from dad.sample_detector import SampleDetector

__all__ = ["SampleRouter", "per_image_scores"]


def per_image_scores(detector: SampleDetector, images: Tensor, chunk: int = 256) -> Tensor:
    """The per-sample scores of many images, ``chunk`` at a time."""
    return torch.cat([detector.scores(part) for part in images.split(chunk)])


class SampleRouter(Router):
    """Purifies each image whose per-sample score exceeds the per-sample threshold (held by the sample detector)."""

    name = "sample"
    summary = "each image is judged and routed on its own per-sample score."
    needs_sample_detector = True

    def decide_batch(self, x: Tensor, features: Tensor, detectors: Detectors) -> Detection:
        sample = detectors.sample
        assert sample is not None
        scores = sample.scores(x, features)
        excess = relative_excess(scores, sample.threshold)
        return Detection(scores.mean(), None, excess, excess > 0)

    def calibrate(self, detectors: Detectors, clean: Tensor, batch_sizes: Sequence[int], target_fpr: float,
                  num_batches: int, generator: torch.Generator) -> dict[str, Any]:
        assert detectors.sample is not None
        return detectors.sample.calibrate(clean, target_fpr)

    def purified_share(self, detectors: Detectors, pool: Tensor, batch_size: int, num_batches: int,
                       generator: torch.Generator | None = None) -> float:
        assert detectors.sample is not None
        return (per_image_scores(detectors.sample, pool) > detectors.sample.threshold).double().mean().item()
