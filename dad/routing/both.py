"""``both``: a batch judged adversarial is purified whole; otherwise the images judged adversarial alone are.

Its two thresholds are calibrated jointly so that the share of clean images purified, by either test, is the
target FPR: the batch test gets :data:`BATCH_SHARE` of it, the per-sample test the rest among the images of the
batches the batch test lets through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dad.detector import DetectorNotCalibratedError, MMDDetector, pool_threshold, random_batches
from dad.routing.base import Detection, Detectors, Router, relative_excess
from dad.routing.sample import per_image_scores
from dad.sample_detector import SampleDetector

__all__ = ["BothRouter", "BATCH_SHARE", "joint_thresholds"]

BATCH_SHARE = 0.5
"""The share of the target FPR the batch test of the ``both`` mode is calibrated for."""


class BothRouter(Router):
    """The batch test, then the per-sample test on the batches it lets through; holds the joint thresholds per
    batch size (buffers: saved and loaded with the defense)."""

    name = "both"
    summary = "a batch judged adversarial is purified whole, otherwise the images judged adversarial alone are."
    min_batch = 2
    batch_share = BATCH_SHARE
    needs_sample_detector = True
    stream = 1

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("batch_sizes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("batch_thresholds", torch.zeros(0))
        self.register_buffer("sample_thresholds", torch.zeros(0))
        self._sizes: list[int] = []  # batch_sizes on the host: choosing thresholds reads nothing back from a device

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        for name in ("batch_sizes", "batch_thresholds", "sample_thresholds"):  # sizes vary with the calibration
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sizes = [int(b) for b in self.batch_sizes.tolist()]

    @property
    def calibrated(self) -> bool:
        return self.batch_sizes.numel() > 0

    def thresholds_for(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """``(batch threshold, per-sample threshold)`` for ``batch_size`` (or the nearest calibrated size)."""
        if not self.calibrated:
            raise DetectorNotCalibratedError("The `both` routing has no thresholds: calibrate it on clean data first")
        i = min(range(len(self._sizes)), key=lambda k: abs(self._sizes[k] - batch_size))
        return self.batch_thresholds[i], self.sample_thresholds[i]

    def decide_batch(self, x: Tensor, features: Tensor, detectors: Detectors) -> Detection:
        assert detectors.sample is not None
        score = detectors.batch.score(x, features)
        batch_threshold, sample_threshold = self.thresholds_for(x.shape[0])
        batch_excess = relative_excess(score, batch_threshold)
        sample_excess = relative_excess(detectors.sample.scores(x, features), sample_threshold)
        return Detection(score, batch_excess, sample_excess, (batch_excess > 0) | (sample_excess > 0))

    @torch.no_grad()
    def estimate(self, detector: MMDDetector, sample_detector: SampleDetector, clean: Tensor,
                 batch_sizes: Sequence[int], target_fpr: float, num_batches: int = 1000,
                 generator: torch.Generator | None = None) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """Both thresholds per batch size from random batches of the clean pool ``clean`` (:func:`joint_thresholds`),
        without storing them and without host synchronisation; the batches are drawn by the CPU ``generator`` (the
        same batches on every device) and moved to the pool's device."""
        pool = clean.shape[0]
        scores_of_images = per_image_scores(sample_detector, clean)
        scorer = detector.batch_scorer(clean)
        found = {}
        for b in sorted({int(b) for b in batch_sizes}):
            order = random_batches(pool, b, num_batches, generator).to(scores_of_images.device)
            found[b] = joint_thresholds(scorer(b, num_batches, order=order), order, scores_of_images, pool,
                                        target_fpr)
        return found

    def calibrate(self, detectors: Detectors, clean: Tensor, batch_sizes: Sequence[int], target_fpr: float,
                  num_batches: int, generator: torch.Generator) -> dict[str, Any]:
        """Set both thresholds per batch size (:meth:`estimate`); returns them with the share of the pool's images
        purified, per batch size."""
        assert detectors.sample is not None
        found = self.estimate(detectors.batch, detectors.sample, clean, batch_sizes, target_fpr, num_batches, generator)
        device = detectors.batch.reference.device
        self.batch_sizes = torch.tensor(list(found), dtype=torch.long, device=device)
        self._sizes = list(found)
        self.batch_thresholds = torch.stack([batch for batch, _, _ in found.values()]).to(device)
        self.sample_thresholds = torch.stack([sample for _, sample, _ in found.values()]).to(device)
        return {b: {"batch_threshold": batch.item(), "sample_threshold": sample.item(),
                    "purified_pool": purified.item(), "num_batches": num_batches}
                for b, (batch, sample, purified) in found.items()}

    @torch.no_grad()
    def purified_share(self, detectors: Detectors, pool: Tensor, batch_size: int, num_batches: int,
                       generator: torch.Generator | None = None) -> float:
        assert detectors.sample is not None
        images = per_image_scores(detectors.sample, pool).cpu()
        order = random_batches(len(pool), batch_size, num_batches, generator)
        scores = detectors.batch.batch_scorer(pool)(batch_size, num_batches, order=order).cpu()
        batch_threshold, sample_threshold = self.thresholds_for(batch_size)
        flagged = (scores > batch_threshold.cpu())[:, None] | (images[order] > sample_threshold.cpu())
        return flagged.double().mean().item()


def joint_thresholds(scores: Tensor, order: Tensor, sample_scores: Tensor, pool: int,
                     target_fpr: float) -> tuple[Tensor, Tensor, Tensor]:
    """The ``both`` mode's thresholds at one batch size, from random clean batches; no host synchronisation.

    The batch threshold takes :data:`BATCH_SHARE` of ``target_fpr`` (with the batch detector's finite-pool
    widening); among the images of the drawn batches it does not flag, the per-sample threshold is the
    quantile that flags ``q = (target - share) / (1 - share)`` of them, so that the expected share of clean
    images purified by either test is ``target_fpr``.

    Args:
        scores: the batch scores of the drawn batches, ``(n,)``.
        order: the drawn batches as rows of indices into the pool, ``(n, B)``, on the scores' device.
        sample_scores: the per-sample score of every pool image, ``(pool,)``.
        pool: the pool's size.
        target_fpr: the share of clean images to purify.

    Returns:
        ``(batch threshold, per-sample threshold, share of the pool's images purified)``: 0-dim tensors.
    """
    batch_fpr = BATCH_SHARE * target_fpr
    rest = (target_fpr - batch_fpr) / (1.0 - batch_fpr)
    scores = scores.double()
    batch_threshold, _ = pool_threshold(scores, pool, order.shape[1], batch_fpr)
    passed = scores <= batch_threshold.double()
    # the passed batches' images by masking, not by boolean indexing: shapes stay independent of the data
    candidates = torch.where(passed[:, None], sample_scores[order].double(), torch.nan).flatten()
    sample_threshold = torch.nanquantile(candidates, 1.0 - rest).float()
    flagged = (~passed).double().mean()
    caught = (candidates > sample_threshold).double().sum() / (passed.double().sum() * order.shape[1])
    return batch_threshold, sample_threshold, flagged + (1.0 - flagged) * caught
