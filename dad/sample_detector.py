"""Per-sample detection with the trained MMD-OPT kernel: a score for each image, calibrated on clean images.

DAD's batch statistic cannot single out one adversarial image among clean ones: a batch that mixes a
few AEs into clean images passes at the detector's false-positive rate. Two per-sample scores from the
same kernel ``k`` (higher: more adversarial):

* ``witness`` (the default): the MMD witness function between a stored set of training AEs ``A`` (the
  kernel's own training AEs, made by the training attack) and clean images ``C`` (the MMD set they were
  made from), ``w(x) = mean_a k(x, a) - mean_c k(x, c)``. AEs of one image look alike in the kernel's
  features, and the witness points from the clean distribution towards that look;
* ``reference``: the MMD^2 between ``{x}`` and the clean reference set ``R``,
  ``k(x, x) - 2 mean_r k(x, r) + mean_{r != r'} k(r, r')``, the RKHS distance from the reference mean.
  A probe on the digits demo's kernel found it separates single AEs *worse* than chance (AUROC 0.39):
  it measures how typical an image is, and AEs can be typical images of another class.

The threshold is the ``1 - fpr`` quantile of the scores of clean calibration images (never the test
images), with a distribution-free 95% interval from the binomial order statistics.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from dad.detector import TARGET_FPR, DetectorNotCalibratedError, check_fpr
from dad.kernels import SemanticKernel
from dad.mmd import FixedRows, fixed_rows
from dad.stats import Z95

__all__ = ["SampleDetector", "SampleScore", "SAMPLE_SCORES", "quantile_interval"]

SampleScore = Literal["witness", "reference"]
SAMPLE_SCORES: tuple[str, ...] = ("witness", "reference")
_SIDES = ("image", "feature")  # the stored images and their features, each prepared by dad.mmd.fixed_rows


def quantile_interval(scores: Tensor, q: float, z: float = Z95) -> tuple[float, float, float]:
    """``(estimate, lower, upper)`` of the ``q`` quantile of ``scores``: the order statistics at ranks
    ``n q -+ z sqrt(n q (1 - q))`` bound it with about 95% coverage whatever the distribution."""
    ordered = scores.detach().flatten().double().sort().values
    n = ordered.numel()
    if n == 0:
        raise ValueError("Expected at least one score")
    spread = z * math.sqrt(n * q * (1 - q))
    lo = min(max(math.floor(n * q - spread), 0), n - 1)
    hi = min(max(math.ceil(n * q + spread), 0), n - 1)
    return torch.quantile(ordered, q).item(), ordered[lo].item(), ordered[hi].item()


class SampleDetector(nn.Module):
    """Scores single images with the MMD-OPT kernel and decides clean vs adversarial per image.

    Args:
        kernel: the trained kernel (shared with the batch detector; frozen).
        clean: clean images ``C`` (the witness's clean side) and the reference set of the ``reference`` score.
        adversarial: training AEs ``A`` (the witness's adversarial side); unused by ``reference``.
        kind: ``witness`` or ``reference`` (see the module docstring).
    """

    def __init__(self, kernel: SemanticKernel, clean: Tensor, adversarial: Tensor,
                 kind: SampleScore = "witness") -> None:
        super().__init__()
        if kind not in SAMPLE_SCORES:
            raise ValueError(f"Expected a sample score in {SAMPLE_SCORES}, got {kind!r}")
        if clean.shape[0] < 2 or (kind == "witness" and adversarial.shape[0] < 1):
            raise ValueError(f"Expected at least 2 clean images and 1 AE, got {clean.shape[0]} and "
                             f"{adversarial.shape[0]}")
        self.kernel = kernel
        self.kind = kind
        self.register_buffer("clean", clean.detach().clone())
        self.register_buffer("adversarial", adversarial.detach().clone())
        for side in _SIDES:  # the stored side of every score, prepared by refresh()
            for field in FixedRows._fields:
                self.register_buffer(f"{side}_{field}", torch.empty(0), persistent=False)
        self.register_buffer("weights", torch.empty(0), persistent=False)
        self.register_buffer("offset", torch.zeros(()), persistent=False)
        self.register_buffer("threshold", torch.full((), float("nan")))
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.refresh()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        for name in ("clean", "adversarial"):  # the stored sets may differ in size from the constructor's
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def refresh(self) -> None:
        """Prepare the stored side of the score; call again if the kernel or the stored sets change.

        Both scores are a weighted sum of kernel values to the stored images plus a constant,
        ``score(x) = sum_j w_j k(x, y_j) + offset``: the witness weighs the AEs ``+1/|A|`` and the clean
        images ``-1/|C|``; the reference score weighs the clean images ``-2/|C|`` with the offset
        ``k(x, x) + mean_{c != c'} k(c, c') = 1 + ...``. The stored images and their features are centred and
        their norms kept, so a batch of B images costs one ``(B, d) x (d, |C| + |A|)`` product per term.
        """
        clean_features = self.kernel.features(self.clean)
        if self.kind == "reference":
            gram = self.kernel.cross_gram(clean_features, clean_features, self.clean, self.clean)
            m = gram.shape[0]
            stored, features = self.clean, clean_features
            self.weights = torch.full((m,), -2.0 / m, dtype=gram.dtype, device=gram.device)
            self.offset = 1.0 + (gram.sum() - gram.diagonal().sum()) / (m * (m - 1))  # k(x, x) = 1
        else:
            stored = torch.cat([self.clean, self.adversarial])
            features = torch.cat([clean_features, self.kernel.features(self.adversarial)])
            c, a = len(self.clean), len(self.adversarial)
            self.weights = torch.cat([torch.full((c,), -1.0 / c, device=features.device),
                                      torch.full((a,), 1.0 / a, device=features.device)])
            self.offset = torch.zeros((), device=features.device)
        for side, rows in zip(_SIDES, (fixed_rows(stored), fixed_rows(features))):
            for field, value in zip(FixedRows._fields, rows):
                setattr(self, f"{side}_{field}", value.float())

    def _fixed(self, side: str) -> FixedRows:
        return FixedRows(*(getattr(self, f"{side}_{field}") for field in FixedRows._fields))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    def scores(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        """Per-sample scores ``(B,)`` of a batch (any size >= 1), differentiable in ``x``.

        Args:
            x: images ``(B, C, H, W)``.
            features: ``phi(x)`` if already computed (the classifier's forward pass can provide it).
        """
        fx = self.kernel.features(x) if features is None else features.reshape(x.shape[0], -1)
        gram = self.kernel.gram_to_fixed(fx, x, self._fixed("feature"), self._fixed("image"))
        return gram @ self.weights.to(gram.dtype) + self.offset.to(gram.dtype)

    def decide(self, scores: Tensor) -> Tensor:
        """True where an image is judged adversarial (its score above the calibrated threshold)."""
        if not self.calibrated:
            raise DetectorNotCalibratedError("The sample detector has no threshold: calibrate it on clean data first")
        return scores > self.threshold

    @torch.no_grad()
    def calibrate(self, clean: Tensor, target_fpr: float = TARGET_FPR, chunk: int = 256) -> dict[str, float]:
        """Set the threshold to the ``1 - fpr`` quantile of the scores of clean calibration images.

        Returns:
            ``{"threshold", "threshold_low", "threshold_high", "num_images", "target_fpr"}``: the threshold
            and its 95% distribution-free interval.
        """
        check_fpr(target_fpr)
        scores = torch.cat([self.scores(part) for part in clean.split(chunk)])
        estimate, low, high = quantile_interval(scores, 1.0 - target_fpr)
        self.threshold.fill_(estimate)
        return {"threshold": estimate, "threshold_low": low, "threshold_high": high, "num_images": len(scores),
                "target_fpr": target_fpr}


def _refresh_after_load(detector: SampleDetector, incompatible_keys: object) -> None:
    """Load hook: rebuild the cached features from the loaded kernel and sets."""
    detector.refresh()
