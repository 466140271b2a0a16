"""Which images the defense purifies: per batch, per image, or both, and the thresholds of each mode.

* ``batch`` (the paper): the batch's MMD score decides for every image of the batch. It assumes the
  attacker controls whole batches; an attacker who mixes a few AEs into clean batches passes it at its
  false-positive rate.
* ``sample``: every image is judged alone by its per-sample score (:mod:`dad.sample_detector`); batches of
  one are allowed. Nothing an attacker does to other images changes an image's route.
* ``both``: a batch judged adversarial is purified whole; otherwise the images judged adversarial alone are.
  Its two thresholds are calibrated jointly (:class:`JointThresholds`) so that the share of clean images
  purified, by either test, is the target FPR: the batch test gets half of it, the per-sample test the
  rest among the images of batches the batch test lets through.
* ``never``: the classifier alone, every image straight to it; ``always``: every image purified (the purifier
  alone in front of the classifier). The two baselines of the same harness: the same attacks and the same
  evaluation rule as the detecting modes, with a routing nobody can move.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from dad.detector import MMDDetector, pool_threshold, random_batches
from dad.sample_detector import SampleDetector

__all__ = ["Routing", "ROUTINGS", "DETECTING", "JointThresholds", "BATCH_SHARE", "relative_excess", "joint_thresholds"]

Routing = Literal["batch", "sample", "both", "never", "always"]
ROUTINGS: tuple[str, ...] = ("batch", "sample", "both", "never", "always")
DETECTING: tuple[str, ...] = ("batch", "sample", "both")
"""The routings decided by the detectors (the others are fixed baselines)."""
BATCH_SHARE = 0.5
"""The share of the target FPR the batch test of the ``both`` mode is calibrated for."""


def relative_excess(score: Tensor, threshold: Tensor) -> Tensor:
    """``(score - threshold) / |threshold|``: positive exactly where the test flags."""
    return (score - threshold) / threshold.abs().clamp_min(1e-12)


class JointThresholds(nn.Module):
    """The batch and per-sample thresholds of the ``both`` mode, per batch size."""

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
            from dad.detector import DetectorNotCalibratedError

            raise DetectorNotCalibratedError("The `both` routing has no thresholds: calibrate it on clean data first")
        i = min(range(len(self._sizes)), key=lambda k: abs(self._sizes[k] - batch_size))
        return self.batch_thresholds[i], self.sample_thresholds[i]

    @torch.no_grad()
    def estimate(self, detector: MMDDetector, sample_detector: SampleDetector, clean: Tensor,
                 batch_sizes: Sequence[int], target_fpr: float, num_batches: int = 1000,
                 generator: torch.Generator | None = None) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """Both thresholds per batch size from random batches of the clean pool ``clean`` (:func:`joint_thresholds`),
        without storing them and without host synchronisation; the batches are drawn by the CPU ``generator`` (the
        same batches on every device) and moved to the pool's device."""
        pool = clean.shape[0]
        sample_scores = torch.cat([sample_detector.scores(part) for part in clean.split(256)])
        scorer = detector.batch_scorer(clean)
        found = {}
        for b in sorted({int(b) for b in batch_sizes}):
            order = random_batches(pool, b, num_batches, generator).to(sample_scores.device)
            found[b] = joint_thresholds(scorer(b, num_batches, order=order), order, sample_scores, pool, target_fpr)
        return found

    def calibrate(self, detector: MMDDetector, sample_detector: SampleDetector, clean: Tensor,
                  batch_sizes: Sequence[int], target_fpr: float, num_batches: int = 1000,
                  generator: torch.Generator | None = None) -> dict[int, dict[str, float]]:
        """Set both thresholds per batch size (:meth:`estimate`); returns them with the share of the pool's images
        purified, per batch size."""
        found = self.estimate(detector, sample_detector, clean, batch_sizes, target_fpr, num_batches, generator)
        device = detector.reference.device
        self.batch_sizes = torch.tensor(list(found), dtype=torch.long, device=device)
        self._sizes = list(found)
        self.batch_thresholds = torch.stack([batch for batch, _, _ in found.values()]).to(device)
        self.sample_thresholds = torch.stack([sample for _, sample, _ in found.values()]).to(device)
        return {b: {"batch_threshold": batch.item(), "sample_threshold": sample.item(),
                    "purified_pool": purified.item(), "num_batches": num_batches}
                for b, (batch, sample, purified) in found.items()}


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
