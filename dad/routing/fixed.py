"""``never`` and ``always``: the fixed baselines of the same harness (the classifier alone; the purifier alone in
front of it), with the same attacks and evaluation rule as the detecting modes and a route nobody can move."""

from __future__ import annotations

import torch
from torch import Tensor

from dad.routing.base import Detection, Detectors, Router

__all__ = ["NeverRouter", "AlwaysRouter"]


class _FixedRouter(Router):
    """No detector runs: the statistic is 0 and the batch excess a constant -1 (never) or +1 (always)."""

    detecting = False
    purifies = False

    def decide_batch(self, x: Tensor, features: Tensor, detectors: Detectors) -> Detection:
        fixed = torch.tensor(1.0 if self.purifies else -1.0, device=x.device)
        flags = torch.full((x.shape[0],), self.purifies, device=x.device)
        return Detection(x.new_zeros(()), fixed, None, flags)

    def purified_share(self, detectors: Detectors, pool: Tensor, batch_size: int, num_batches: int,
                       generator: torch.Generator | None = None) -> float:
        return float(self.purifies)


class NeverRouter(_FixedRouter):
    """No image is purified."""

    name = "never"
    summary = "no image is purified: the classifier alone, a baseline evaluated with the same attacks."


class AlwaysRouter(_FixedRouter):
    """Every image is purified."""

    name = "always"
    summary = "every image is purified: the purifier alone in front of the classifier, a baseline."
    purifies = True
