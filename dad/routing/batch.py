"""``batch`` (the paper's): the batch's MMD-OPT score against the clean reference set routes the whole batch.

It assumes the attacker controls whole batches: an attacker who mixes a few AEs into clean batches passes it at its
false-positive rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dad.detector import random_batches
from dad.routing.base import Detection, Detectors, Router, relative_excess

__all__ = ["BatchRouter"]


class BatchRouter(Router):
    """Purifies the whole batch when its score exceeds the threshold calibrated for its size (held by the detector)."""

    name = "batch"
    summary = ("each batch's MMD score decides for the whole batch (the paper's; it assumes the attacker controls "
               "whole batches).")
    min_batch = 2
    batch_share = 1.0

    def decide_batch(self, x: Tensor, features: Tensor, detectors: Detectors) -> Detection:
        score = detectors.batch.score(x, features)
        excess = relative_excess(score, detectors.batch.threshold_for(x.shape[0]))
        return Detection(score, excess, None, (excess > 0).expand(x.shape[0]))

    def calibrate(self, detectors: Detectors, clean: Tensor, batch_sizes: Sequence[int], target_fpr: float,
                  num_batches: int, generator: torch.Generator) -> dict[str, Any]:
        return detectors.batch.calibrate(clean, batch_sizes, num_batches, target_fpr, generator)

    def purified_share(self, detectors: Detectors, pool: Tensor, batch_size: int, num_batches: int,
                       generator: torch.Generator | None = None) -> float:
        order = random_batches(len(pool), batch_size, num_batches, generator)
        scores = detectors.batch.batch_scorer(pool)(batch_size, num_batches, order=order).cpu()
        return (scores > detectors.batch.threshold_for(batch_size).cpu()).double().mean().item()
