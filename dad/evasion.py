"""Examples that evade the MMD-OPT tests, crafted against the current kernel: the inner step of evasion-aware
kernel training.

The kernel of the paper only ever sees a fixed set of AEs (MMA examples of the classifier) and learns to separate
those from clean images; nothing in its training meets an attacker who tries not to be seen, and such an attacker
(``evade_clean``, orthogonal PGD) walks around it. The robust deep-kernel two-sample tests of Xu, Zhang, Liu et al.
(ICML 2022, "Adversarial attacks and defense for non-parametric two-sample tests") train max-min instead: at
every kernel step, examples are crafted against the current kernel to lower the test statistic, and the kernel
then maximises its test power against them too. Here each crafted example also raises the classifier's loss
inside the eps ball (an evasion that does not fool the classifier is no threat to DAD), and lowers both tests
DAD runs: the batch's MMD-OPT statistic against the clean images, and each image's witness score
(:mod:`dad.sample_detector`) between the batch's training AEs and its clean images.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks.common import Norm, ascent_step, random_delta
from dad.kernels import SemanticKernel
from dad.mmd import mmd2_unbiased

__all__ = ["DetectionReference", "detection_reference", "relative_terms", "detection_terms", "evasion_examples"]

_TINY = 1e-12


def _witness(kernel: SemanticKernel, fz: Tensor, z: Tensor, fa: Tensor, a: Tensor, fc: Tensor, c: Tensor) -> Tensor:
    """The witness score of each ``z``: mean kernel to the AEs ``a`` minus mean kernel to the clean images ``c``."""
    return kernel.cross_gram(fz, fa, z, a).mean(1) - kernel.cross_gram(fz, fc, z, c).mean(1)


class DetectionReference(NamedTuple):
    """What :func:`relative_terms` compares an example with, fixed while examples are crafted: the clean images
    and fixed AEs with their features, the fixed AEs' batch statistic, the clean images' mean witness score, and
    the fixed AEs' witness score above it."""

    clean: Tensor
    adversarial: Tensor
    clean_features: Tensor
    adversarial_features: Tensor
    mmd_fixed: Tensor
    clean_level: Tensor
    gap: Tensor


@torch.no_grad()
def detection_reference(kernel: SemanticKernel, clean: Tensor, adversarial: Tensor) -> DetectionReference:
    """The :class:`DetectionReference` of a clean batch and its fixed AEs under the current kernel."""
    fc, fa = kernel.features(clean), kernel.features(adversarial)
    mmd_fixed = mmd2_unbiased(*kernel.gram_from_features(fc, fa, clean, adversarial))
    clean_level = _witness(kernel, fc, clean, fa, adversarial, fc, clean).mean()
    gap = _witness(kernel, fa, adversarial, fa, adversarial, fc, clean).mean() - clean_level
    return DetectionReference(clean, adversarial, fc, fa, mmd_fixed, clean_level, gap)


def relative_terms(kernel: SemanticKernel, ref: DetectionReference, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(MMD^2_u(clean, z), the witness scores of z)`` relative to the fixed AEs: 1 is as detectable as they are,
    0 as the clean images (the batch statistic; per image, the clean images' mean witness score), the two
    statistics an evading example lowers. Differentiable in ``z``."""
    fz = kernel.features(z)
    mmd = mmd2_unbiased(*kernel.gram_from_features(ref.clean_features, fz, ref.clean, z))
    witness = _witness(kernel, fz, z, ref.adversarial_features, ref.adversarial, ref.clean_features, ref.clean)
    return mmd / (ref.mmd_fixed.abs() + _TINY), (witness - ref.clean_level) / (ref.gap.abs() + _TINY)


def detection_terms(kernel: SemanticKernel, clean: Tensor, adversarial: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`relative_terms` of ``z`` against the clean batch ``clean`` and its fixed AEs ``adversarial``."""
    return relative_terms(kernel, detection_reference(kernel, clean, adversarial), z)


def evasion_examples(kernel: SemanticKernel, classifier: nn.Module, clean: Tensor, labels: Tensor,
                     adversarial: Tensor, eps: float, step_size: float, steps: int, weight: float = 1.0,
                     norm: Norm = "linf") -> Tensor:
    """Examples within ``eps`` of ``clean`` that raise the classifier's cross-entropy while lowering, by ``weight``,
    the relative batch statistic and witness scores (:func:`detection_terms`) down to the clean images' level
    (hinges: below it an example is no less visible, and pushing a witness score past the clean side raises the
    batch statistic): ``steps`` of PGD from a random start, the iterate with the best objective kept (the batch
    statistic belongs to the whole batch: sign steps on it overshoot). Only the inputs move (gradients are taken
    with respect to them alone); detached images in [0, 1]."""
    ref = detection_reference(kernel, clean, adversarial)  # the clean and fixed sides do not move: once
    z = (clean + random_delta(clean, eps, norm)).clamp(0.0, 1.0)
    best, best_value = z, torch.tensor(float("-inf"), device=z.device)
    for k in range(steps + 1):
        z = z.detach().requires_grad_(True)
        mmd, witness = relative_terms(kernel, ref, z)
        objective = F.cross_entropy(classifier(z), labels) - weight * (F.relu(mmd) + F.relu(witness).mean())
        better = objective.detach() > best_value  # the batch statistic is the batch's: keep the best batch
        best = torch.where(better, z.detach(), best)
        best_value = torch.where(better, objective.detach(), best_value)
        if k < steps:
            grad = torch.autograd.grad(objective, z)[0]
            z = ascent_step(z.detach(), clean, grad, eps, step_size, norm)
    return best
