"""Batch-level detection of adversarial inputs with MMD-OPT against clean reference data.

A batch is scored by the unbiased MMD^2 between it and a fixed set of clean reference images; a
batch whose score exceeds the calibrated threshold is judged adversarial. The null distribution of the
score depends on the batch size, so thresholds are calibrated per batch size on clean held-out data at
a target false-positive rate, instead of the hand-set number of the published code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dad.kernels import SemanticKernel
from dad.mmd import mmd2_unbiased_unpaired

__all__ = ["MMDDetector", "DetectorNotCalibratedError", "finite_pool_factor", "pool_threshold", "random_batches",
           "TARGET_FPR", "check_fpr"]

log = logging.getLogger(__name__)


class DetectorNotCalibratedError(RuntimeError):
    """Raised when a decision is asked of a detector whose threshold was never calibrated."""


TARGET_FPR = 0.05
"""The default target false-positive rate: the share of clean images (or batches) a calibrated test flags."""


def check_fpr(target_fpr: float) -> None:
    """Raise a one-line ValueError unless ``target_fpr`` is a rate in (0, 1)."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"Expected `target_fpr` in (0, 1), got {target_fpr}")


class MMDDetector(nn.Module):
    """Scores batches against a clean reference set and decides clean vs adversarial.

    Args:
        kernel: the trained MMD-OPT kernel (kept frozen here).
        reference: clean reference images ``(R, C, H, W)`` in [0, 1], R >= 2.
    """

    def __init__(self, kernel: SemanticKernel, reference: Tensor) -> None:
        super().__init__()
        if reference.dim() < 2 or reference.shape[0] < 2:
            raise ValueError(f"Expected a reference set of at least 2 images, got shape {tuple(reference.shape)}")
        self.kernel = kernel
        self.register_buffer("reference", reference.detach().clone())
        self.register_buffer("ref_features", torch.empty(0))
        # k(reference, reference) does not depend on the batch: computed once (it dominates the score's cost
        # from ~500 reference images on), and recomputed from the loaded weights rather than saved.
        self.register_buffer("ref_gram", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.register_buffer("batch_sizes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("thresholds", torch.zeros(0))
        self._sizes: list[int] = []  # batch_sizes on the host: choosing a threshold reads nothing back from a device
        self._warned_sizes: set[int] = set()
        self.refresh_reference_features()

    @torch.no_grad()
    def refresh_reference_features(self) -> None:
        """Cache ``phi(reference)`` and the reference gram; call again if the kernel changes."""
        self.ref_features = self.kernel.features(self.reference).detach()
        self._refresh_ref_gram()

    @torch.no_grad()
    def _refresh_ref_gram(self) -> None:
        self.ref_gram = self.kernel.cross_gram(self.ref_features, self.ref_features, self.reference, self.reference)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Calibration buffers change size with the number of calibrated batch sizes: adopt the saved shapes.
        for name in ("reference", "ref_features", "batch_sizes", "thresholds"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def score(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        """Unbiased MMD^2 between the batch ``x`` and the reference set (differentiable in ``x``).

        Args:
            x: batch of images ``(B, C, H, W)``, B >= 2.
            features: ``phi(x)`` if already computed (the classifier's forward pass can provide it).
        """
        if x.shape[0] < 2:
            raise ValueError(f"Detection needs a batch of at least 2 images, got {x.shape[0]}")
        if x.shape[1:] != self.reference.shape[1:]:
            raise ValueError(
                f"Expected images of shape {tuple(self.reference.shape[1:])} like the reference set, "
                f"got {tuple(x.shape[1:])}"
            )
        fx = self.kernel.features(x) if features is None else features.reshape(x.shape[0], -1)
        kxx = self.kernel.cross_gram(fx, fx, x, x)
        kxr = self.kernel.cross_gram(fx, self.ref_features, x, self.reference)
        return mmd2_unbiased_unpaired(kxx, self.ref_gram, kxr)

    @property
    def calibrated(self) -> bool:
        return self.thresholds.numel() > 0

    def threshold_for(self, batch_size: int) -> Tensor:
        """The threshold calibrated for ``batch_size``, or for the nearest calibrated size (with a warning)."""
        if not self.calibrated:
            raise DetectorNotCalibratedError("The detector has no threshold: calibrate it on clean data first")
        sizes = self._sizes
        if batch_size in sizes:
            return self.thresholds[sizes.index(batch_size)]
        nearest = min(range(len(sizes)), key=lambda i: abs(sizes[i] - batch_size))
        if batch_size not in self._warned_sizes:
            self._warned_sizes.add(batch_size)
            log.warning("No threshold calibrated for batch size %d; using the one for %d (the FPR may differ from "
                        "its target)", batch_size, sizes[nearest])
        return self.thresholds[nearest]

    def decide(self, score: Tensor, batch_size: int) -> Tensor:
        """True where the batch is judged adversarial (score above its threshold)."""
        return score > self.threshold_for(batch_size)

    @torch.no_grad()
    def batch_scorer(self, pool: Tensor) -> Callable[..., Tensor]:
        """Scores of many random batches drawn from ``pool``, computed from one set of gram matrices.

        Returns a function ``(batch_size, num_batches, generator, order=None) -> scores`` whose every score
        equals :meth:`score` of the corresponding batch (drawn without replacement inside a batch, or the rows
        of the index matrix ``order`` when given): the gram matrices of the pool against itself and the
        reference are computed once, and each batch's score is read off them by indexing (``B^2`` entries
        per batch, whatever the pool's size).
        """
        fp = torch.cat([self.kernel.features(chunk) for chunk in pool.split(256)])
        k_pp = self.kernel.cross_gram(fp, fp, pool, pool)
        k_pr = self.kernel.cross_gram(fp, self.ref_features, pool, self.reference)
        r = self.reference.shape[0]
        ref_term = (self.ref_gram.sum() - self.ref_gram.diagonal().sum()) / (r * (r - 1))
        diagonal = k_pp.diagonal()
        cross = k_pr.mean(1)
        size = pool.shape[0]

        def scores(batch_size: int, num_batches: int, generator: torch.Generator | None = None,
                   order: Tensor | None = None) -> Tensor:
            if not 2 <= batch_size <= size:
                raise ValueError(f"Expected a batch size in [2, {size}] (the pool's size), got {batch_size}")
            if order is None:
                order = random_batches(size, batch_size, num_batches, generator)
            order = order.to(k_pp.device)
            out = []
            for idx in order.split(max(1, 2**22 // batch_size**2)):  # bounds the (n, B, B) block to 16 MiB
                block = k_pp[idx[:, :, None], idx[:, None, :]].sum((1, 2)) - diagonal[idx].sum(1)
                out.append(block / (batch_size * (batch_size - 1)) + ref_term - 2.0 * cross[idx].sum(1) / batch_size)
            return torch.cat(out)

        return scores

    @torch.no_grad()
    def calibrate(
        self,
        clean: Tensor,
        batch_sizes: Sequence[int],
        num_batches: int = 1000,
        target_fpr: float = TARGET_FPR,
        generator: torch.Generator | None = None,
    ) -> dict[int, dict[str, float]]:
        """Set one threshold per batch size so that clean batches exceed it with rate ``target_fpr``.

        Draws ``num_batches`` random batches (without replacement inside a batch) from the pool of
        clean held-out images, so the ``1 - target_fpr`` quantile is estimated from many batches even
        when the pool holds only a few disjoint ones. Batches drawn from one finite pool vary less
        around the pool's own mean than fresh batches from the population do (whose deviation adds
        the pool's own offset), so the quantile's distance from the mean is widened by
        :func:`finite_pool_factor`: the threshold targets the FPR on new data, not on this pool.

        Args:
            clean: clean held-out images ``(P, C, H, W)``, disjoint from the reference set.
            batch_sizes: the batch sizes to calibrate (each in [2, P]).
            num_batches: batches drawn per size.
            target_fpr: the false-positive rate to calibrate for.
            generator: CPU random generator, for reproducible calibration.

        Returns:
            ``{batch_size: {"threshold", "fpr_pool", "spread_factor", "num_batches"}}``; ``fpr_pool`` is
            the rate measured on the pool's own draws (below the target by design).
        """
        check_fpr(target_fpr)
        pool = clean.shape[0]
        if num_batches < 1:
            raise ValueError(f"Expected `num_batches` >= 1, got {num_batches}")
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 2 or sizes[-1] >= pool:
            raise ValueError(
                f"Expected batch sizes in [2, {pool}) (below the clean pool's size), got {list(batch_sizes)}")
        min_batches = math.ceil(20 / target_fpr)
        if num_batches < min_batches:
            log.warning("%d batches estimate a %.3f quantile poorly; use >= %d", num_batches, 1 - target_fpr,
                        min_batches)
        found = self.estimate(clean, sizes, num_batches, generator, target_fpr)
        device = self.reference.device
        self.batch_sizes = torch.tensor(sizes, dtype=torch.long, device=device)
        self.thresholds = torch.stack([threshold for threshold, _, _ in found.values()]).to(device)
        self._sizes = sizes
        self._warned_sizes.clear()
        return {b: {"threshold": threshold.item(), "fpr_pool": fpr_pool.item(), "spread_factor": factor,
                    "num_batches": num_batches} for b, (threshold, fpr_pool, factor) in found.items()}

    @torch.no_grad()
    def estimate(self, clean: Tensor, batch_sizes: Sequence[int], num_batches: int,
                 generator: torch.Generator | None = None,
                 target_fpr: float = TARGET_FPR) -> dict[int, tuple[Tensor, Tensor, float]]:
        """What :meth:`calibrate` sets, without storing it and without host synchronisation: per batch size the
        threshold at the target FPR, the FPR on the pool's own draws and the spread factor."""
        scorer = self.batch_scorer(clean)
        found = {}
        for b in batch_sizes:
            scores = scorer(b, num_batches, generator).double()
            threshold, factor = pool_threshold(scores, clean.shape[0], b, target_fpr)
            found[b] = (threshold, (scores > threshold).float().mean(), factor)
        return found


def _refresh_after_load(detector: MMDDetector, incompatible_keys: object) -> None:
    """Load hook: rebuild the reference gram from the loaded kernel and reference features, and read the
    calibrated batch sizes to the host."""
    detector._refresh_ref_gram()
    detector._sizes = [int(b) for b in detector.batch_sizes.tolist()]


def random_batches(pool: int, batch_size: int, num_batches: int, generator: torch.Generator | None = None) -> Tensor:
    """``(num_batches, batch_size)`` indices into a pool of ``pool`` images, without replacement in a batch."""
    # drawn by a CPU generator: the same batches (hence thresholds) on every device; callers move them
    keys = torch.rand(num_batches, pool, generator=generator)  # cpu: reproducible across devices
    return keys.argsort(1)[:, :batch_size]


def pool_threshold(scores: Tensor, pool: int, batch_size: int, fpr: float) -> tuple[Tensor, float]:
    """The threshold of random batches' ``scores`` drawn from a pool of ``pool`` images at a false-positive rate
    ``fpr`` on fresh batches: the ``1 - fpr`` quantile's distance from the mean widened by
    :func:`finite_pool_factor`. Returns the threshold and the factor."""
    centre = scores.mean()
    factor = finite_pool_factor(pool, batch_size)
    return (centre + factor * (torch.quantile(scores, 1.0 - fpr) - centre)).float(), factor


def finite_pool_factor(pool: int, batch_size: int) -> float:
    """Widening of the batch-score spread from draws of a finite pool to fresh draws of the population.

    To first order a batch score is a mean over its ``b`` images. A batch drawn without replacement
    from a pool of ``N`` has variance ``s^2/b (N-b)/(N-1)`` around the pool's mean, while a new batch's
    deviation from that mean has variance ``s^2/b + s^2/N``. The factor is the square root of the ratio.
    """
    if pool <= batch_size:
        raise ValueError(f"The calibration pool ({pool}) must be larger than the batch size ({batch_size})")
    return math.sqrt((1.0 + batch_size / pool) * (pool - 1) / (pool - batch_size))
