"""The semantic-aware deep kernel of DAD and the MMD-OPT module that learns it.

``k(x, y) = (1 - eps) exp(-|phi(x) - phi(y)|^2 / sigma_phi - |x - y|^2 / sigma_q) + eps exp(-|x - y|^2 / sigma_q)``

``phi`` is a feature extractor (the penultimate layer of a trained classifier), ``x, y`` the flattened
raw images. The ``eps`` term keeps the kernel characteristic (a plain Gaussian on the images), the
first term makes it sensitive to semantic differences.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from dad.mmd import (FixedRows, j_statistic, mmd2_biased, mmd2_unbiased, mmd2_unbiased_unpaired, mmd2_variance,
                     pairwise_sq_dists, sq_dists_to_fixed)

__all__ = ["semantic_gram", "SemanticKernel", "Grams", "Estimator", "ESTIMATORS"]

Estimator = Literal["unbiased", "biased", "unpaired"]
Grams = tuple[Tensor, Tensor, Tensor]

ESTIMATORS = {"unbiased": mmd2_unbiased, "biased": mmd2_biased, "unpaired": mmd2_unbiased_unpaired}


def semantic_gram(
    fx: Tensor,
    fy: Tensor,
    x: Tensor,
    y: Tensor,
    sigma_phi: float | Tensor,
    sigma_q: float | Tensor,
    eps: float | Tensor,
) -> Tensor:
    """Gram matrix ``K[i, j] = k(x_i, y_j)`` of the semantic kernel.

    Args:
        fx, fy: features ``phi(x)``, ``phi(y)`` of shapes ``(n, ...)`` and ``(m, ...)``.
        x, y: the raw inputs, shapes ``(n, ...)`` and ``(m, ...)``.
        sigma_phi, sigma_q: positive bandwidths (floats or scalar tensors).
        eps: mixing weight in [0, 1].

    Returns:
        Tensor of shape ``(n, m)``.
    """
    return _combine(pairwise_sq_dists(fx, fy), pairwise_sq_dists(x, y), sigma_phi, sigma_q, eps)


def _combine(d_phi: Tensor, d_q: Tensor, sigma_phi: float | Tensor, sigma_q: float | Tensor,
             eps: float | Tensor) -> Tensor:
    """The kernel from the squared feature and image distances."""
    d_q = d_q / sigma_q
    return (1.0 - eps) * torch.exp(-d_phi / sigma_phi - d_q) + eps * torch.exp(-d_q)


def _features(module: nn.Module, x: Tensor) -> Tensor:
    extract = getattr(module, "forward_features", None)
    out = extract(x) if callable(extract) else module(x)
    return out.reshape(out.shape[0], -1)


class SemanticKernel(nn.Module):
    """MMD-OPT: the semantic kernel with learnable ``eps``, ``sigma_phi``, ``sigma_q``.

    The parameters are stored unconstrained (``eps`` as a logit, the bandwidths as logarithms) so that
    gradient ascent on the test power can never leave their valid ranges. The feature extractor is
    frozen by default (no gradient to its weights, always in eval mode, so its batch-norm statistics
    never move); gradients still flow through it to the *inputs*, which the denoiser needs.

    Args:
        feature_extractor: ``phi``; its ``forward_features`` is used when it has one, else its ``forward``.
        train_features: also learn ``phi`` (the paper's optional variant).
        sigma_phi, sigma_q, eps: initial values, replaced by :meth:`init_bandwidths` before training.
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        train_features: bool = False,
        sigma_phi: float = 1.0,
        sigma_q: float = 1.0,
        eps: float = 1e-10,
    ) -> None:
        super().__init__()
        for name, value in (("sigma_phi", sigma_phi), ("sigma_q", sigma_q)):
            if not value > 0:
                raise ValueError(f"Expected `{name}` > 0, got {value}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"Expected `eps` in (0, 1), got {eps}")
        self.phi = feature_extractor
        self.train_features = train_features
        self.eps_logit = nn.Parameter(torch.tensor(math.log(eps) - math.log1p(-eps)))
        self.log_sigma_phi = nn.Parameter(torch.tensor(math.log(sigma_phi)))
        self.log_sigma_q = nn.Parameter(torch.tensor(math.log(sigma_q)))
        self.register_buffer("initialized", torch.tensor(False))
        self.phi.requires_grad_(train_features)
        self.train(self.training)

    @property
    def eps(self) -> Tensor:
        return torch.sigmoid(self.eps_logit)

    @property
    def sigma_phi(self) -> Tensor:
        return self.log_sigma_phi.exp()

    @property
    def sigma_q(self) -> Tensor:
        return self.log_sigma_q.exp()

    def train(self, mode: bool = True) -> "SemanticKernel":
        """Set train/eval mode; a frozen ``phi`` stays in eval mode whatever ``mode`` is."""
        super().train(mode)
        if not self.train_features:
            self.phi.train(False)
        return self

    def features(self, x: Tensor) -> Tensor:
        """``phi(x)``, flattened to ``(n, d)``, in float32 even under mixed precision: the statistics are computed
        from float32 features (the denoiser's shared forward, :func:`~dad.networks.logits_and_features`, aside)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _features(self.phi, x)

    @torch.no_grad()
    def init_bandwidths(self, x: Tensor, y: Tensor, eps: float = 1e-10) -> None:
        """Initialise as the paper does from a clean sample ``x`` and an adversarial sample ``y``.

        ``sigma_phi`` = median squared feature distance between the two samples,
        ``sigma_q`` = 2 x H x W of the images, ``eps`` = ``eps``.
        """
        d_phi = pairwise_sq_dists(self.features(x), self.features(y))
        median = d_phi.median().clamp_min(1e-6)
        height, width = x.shape[-2], x.shape[-1]
        self.log_sigma_phi.copy_(median.log())
        self.log_sigma_q.fill_(math.log(2.0 * height * width))
        self.eps_logit.fill_(math.log(eps) - math.log1p(-eps))
        self.initialized.fill_(True)

    def cross_gram(self, fx: Tensor, fy: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``K[i, j] = k(x_i, y_j)`` from precomputed features, in float32 even under mixed precision."""
        fx, fy, x, y = (t.float() for t in (fx, fy, x, y))
        with torch.autocast(device_type=x.device.type, enabled=False):  # bf16 would ruin the distances
            return semantic_gram(fx, fy, x, y, self.sigma_phi.float(), self.sigma_q.float(), self.eps.float())

    def gram_to_fixed(self, fx: Tensor, x: Tensor, fixed_features: FixedRows, fixed_images: FixedRows) -> Tensor:
        """``K[i, j] = k(x_i, y_j)`` to a stored set prepared by :func:`~dad.mmd.fixed_rows`, in float32."""
        fx, x = fx.float(), x.float()
        fixed_features, fixed_images = (FixedRows(*(t.float() for t in f)) for f in (fixed_features, fixed_images))
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _combine(sq_dists_to_fixed(fx, fixed_features), sq_dists_to_fixed(x, fixed_images),
                            self.sigma_phi.float(), self.sigma_q.float(), self.eps.float())

    def gram_from_features(self, fx: Tensor, fy: Tensor, x: Tensor, y: Tensor) -> Grams:
        """``(Kxx, Kyy, Kxy)`` from precomputed features (used when features are gathered across ranks)."""
        return self.cross_gram(fx, fx, x, x), self.cross_gram(fy, fy, y, y), self.cross_gram(fx, fy, x, y)

    def gram(self, x: Tensor, y: Tensor) -> Grams:
        """``(Kxx, Kyy, Kxy)`` of two batches; ``phi`` runs once on both."""
        feats = self.features(torch.cat([x, y]))
        return self.gram_from_features(feats[: x.shape[0]], feats[x.shape[0] :], x, y)

    def mmd2(self, x: Tensor, y: Tensor, estimator: Estimator = "unbiased") -> Tensor:
        """MMD^2 between two batches with the chosen estimator (``unbiased`` is paired)."""
        if estimator not in ESTIMATORS:
            raise ValueError(f"Unknown estimator {estimator!r}; expected one of {sorted(ESTIMATORS)}")
        return ESTIMATORS[estimator](*self.gram(x, y))

    def j_statistic(self, x: Tensor, y: Tensor, reg: float = 1e-8) -> Tensor:
        """Test power proxy J of a paired (clean, adversarial) batch."""
        return j_statistic(*self.gram(x, y), reg=reg)

    def statistics(self, x: Tensor, y: Tensor, reg: float = 1e-8) -> dict[str, Tensor]:
        """MMD^2 (unbiased), its variance and J from one set of gram matrices, for logging."""
        grams = self.gram(x, y)
        return {"mmd2": mmd2_unbiased(*grams), "variance": mmd2_variance(*grams), "j": j_statistic(*grams, reg=reg)}
