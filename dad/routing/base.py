"""What every routing mode is: a :class:`Router` decides which images of a batch the defense purifies.

A router reads the detectors (:class:`Detectors`: the batch MMD-OPT test and the per-sample witness), calibrates
the thresholds it decides with at a target false-positive rate (the share of clean images purified), measures
that share on clean data, and carries its own calibrated state (saved and loaded with the defense's state
dict). The defense holds one router per mode, so its routing stays settable after calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from dad.detector import TARGET_FPR, MMDDetector
from dad.sample_detector import SampleDetector

__all__ = ["Router", "Detection", "Detectors", "relative_excess", "TARGET_FPR"]


def relative_excess(score: Tensor, threshold: Tensor) -> Tensor:
    """``(score - threshold) / |threshold|``: positive exactly where the test flags."""
    return (score - threshold) / threshold.abs().clamp_min(1e-12)


@dataclass
class Detection:
    """What the detectors say of a batch, differentiable in its images.

    Attributes:
        score: the statistic the routing reports: the batch's MMD^2 against the reference set (``batch``,
            ``both``), the mean per-sample score (``sample``), 0 under the fixed routings.
        batch_excess: ``(score - threshold) / |threshold|`` of the batch test (None in ``sample`` routing; a
            constant -1 or +1 without gradient under ``never`` / ``always``, so objectives see a fixed route).
        sample_excess: the same per image for the per-sample test, shape ``(B,)`` (None in ``batch`` routing).
        flags: the routing decision per image, shape ``(B,)``: True where the image is purified.
    """

    score: Tensor
    batch_excess: Tensor | None
    sample_excess: Tensor | None
    flags: Tensor


class Detectors(NamedTuple):
    """The tests a router reads: the batch detector, and the per-sample detector where the defense has one."""

    batch: MMDDetector
    sample: SampleDetector | None


class Router(nn.Module):
    """Decides, calibrates and measures one routing mode (subclasses: one per mode, in :data:`dad.routing.ROUTERS`).

    Class attributes:
        name: the mode's name (``defense.routing``, ``eval.routing``).
        summary: one sentence for reports.
        detecting: whether detectors decide (False for the fixed baselines, which have nothing to calibrate).
        min_batch: the smallest batch the mode can judge (a batch test needs 2 images).
        batch_share: the share of the target FPR the batch test spends (the FPR check's noise model).
        needs_sample_detector: whether the mode reads the per-sample test.
        stream: the calibration's random stream (its batches are drawn by a CPU generator seeded ``seed + stream``).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    detecting: ClassVar[bool] = True
    min_batch: ClassVar[int] = 1
    batch_share: ClassVar[float] = 0.0
    needs_sample_detector: ClassVar[bool] = False
    stream: ClassVar[int] = 0

    def decide(self, x: Tensor, features: Tensor, detectors: Detectors) -> Detection:
        """The routing decision on the batch ``x`` (``features``: ``phi(x)``). A leading dimension of independent
        runs, ``x`` of shape ``(R, B, C, H, W)``, is decided run by run: each run is its own detector batch."""
        if x.dim() == 5:
            runs = [self.decide_batch(xr, fr, detectors) for xr, fr in zip(x, features)]
            return Detection(torch.stack([d.score for d in runs]), _stacked([d.batch_excess for d in runs]),
                             _stacked([d.sample_excess for d in runs]), torch.stack([d.flags for d in runs]))
        return self.decide_batch(x, features, detectors)

    def decide_batch(self, x: Tensor, features: Tensor, detectors: Detectors) -> Detection:
        """The decision on one batch ``(B, C, H, W)``."""
        raise NotImplementedError

    @property
    def calibrated(self) -> bool:
        """Whether the thresholds this mode decides with are set."""
        return True

    def calibrate(self, detectors: Detectors, clean: Tensor, batch_sizes: Sequence[int], target_fpr: float,
                  num_batches: int, generator: torch.Generator) -> dict[str, Any]:
        """Set this mode's thresholds on the clean pool ``clean``; returns what was set, for the logs."""
        return {}

    def purified_share(self, detectors: Detectors, pool: Tensor, batch_size: int, num_batches: int,
                       generator: torch.Generator | None = None) -> float:
        """The share of the clean images of ``pool`` this mode purifies, on ``num_batches`` random batches."""
        raise NotImplementedError


def _stacked(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.stack(parts)  # type: ignore[arg-type]
