"""Evaluation metrics of a batch-level detector-defense: AUROC and rates of batch scores, per-sample worst
cases, and batches that mix clean and adversarial images.

Detection is per batch, so every metric here names its batch size; a defense is always run on whole
batches, never image by image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc, binary_roc

__all__ = [
    "auroc", "roc_curve", "rate_above", "worst_case", "batched_predictions", "mixed_batch_rates", "even_splits",
    "seeded",
]


def _scaled(negatives: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """Scores of both classes rescaled (monotonically, in float64) to [0, 1], with 0/1 targets.

    torchmetrics squashes scores outside [0, 1] with a sigmoid in float32, which would tie the tiny MMD
    scores of nearby batches; a min-max rescaling in float64 keeps their order exactly.
    """
    if negatives.numel() == 0 or positives.numel() == 0:
        raise ValueError("Expected at least one clean and one adversarial score")
    scores = torch.cat([negatives.flatten(), positives.flatten().to(negatives.device)]).double()
    span = (scores.max() - scores.min()).clamp_min(torch.finfo(torch.float64).tiny)
    target = torch.cat([torch.zeros(negatives.numel(), dtype=torch.long, device=scores.device),
                        torch.ones(positives.numel(), dtype=torch.long, device=scores.device)])
    return (scores - scores.min()) / span, target


def auroc(negatives: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of scores that should be higher for ``positives`` (adversarial batches)."""
    scores, target = _scaled(negatives, positives)
    return binary_auroc(scores, target).item()


def roc_curve(negatives: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """``(fpr, tpr)`` of the ROC curve over all thresholds."""
    scores, target = _scaled(negatives, positives)
    fpr, tpr, _ = binary_roc(scores, target)
    return fpr, tpr


def rate_above(scores: Tensor, threshold: float | Tensor) -> float:
    """Fraction of batch scores above the threshold (the detector flags ``score > threshold``)."""
    return (scores > threshold).float().mean().item() if scores.numel() else float("nan")


def worst_case(correct: Sequence[Tensor]) -> Tensor:
    """Per-sample worst case over attacks: a sample is robust only if every attack left it correct."""
    if not correct:
        raise ValueError("Expected the per-sample results of at least one attack")
    return torch.stack([c.bool() for c in correct]).all(0)


def even_splits(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches of ``batch_size``; a last batch of one image joins the previous
    one (a batch score needs at least two images)."""
    if batch_size < 2:
        raise ValueError(f"Expected `batch_size` >= 2, got {batch_size}")
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


@contextmanager
def seeded(seed: int, like: Tensor) -> Iterator[None]:
    """Run the block with the random generators (CPU, and ``like``'s GPU) seeded, restoring them after.

    The defense's noise then depends on the seed only, not on what ran before in this process, so
    results agree across runs and across the ranks of a distributed evaluation.
    """
    with torch.random.fork_rng(devices=[like.device] if like.device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def batched_predictions(defense: nn.Module, x: Tensor, batch_size: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The defense's predictions on ``x`` run in consecutive whole batches of ``batch_size``.

    The defense's noise is seeded by ``seed`` (see :func:`seeded`).

    Returns:
        ``(predictions (N,), batch scores (M,), batch decisions (M,))``.
    """
    with seeded(seed, x):
        return _batched_predictions(defense, x, batch_size)


def _batched_predictions(defense: nn.Module, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    preds, scores, flags = [], [], []
    for start, stop in even_splits(len(x), batch_size):
        out = defense.forward_with_info(x[start:stop])
        preds.append(out.logits.argmax(1))
        scores.append(out.score.detach().reshape(()))
        flags.append(out.adversarial.reshape(()))
    return torch.cat(preds), torch.stack(scores), torch.stack(flags)


@torch.no_grad()
def mixed_batch_rates(
    defense: nn.Module,
    clean: Tensor,
    adv: Tensor,
    y: Tensor,
    fraction: float,
    batch_size: int,
    num_batches: int,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> dict[str, float | int | None]:
    """Detection and accuracy on batches in which a fraction of the images are AEs.

    Each batch draws ``batch_size`` distinct samples; ``round(fraction * batch_size)`` of them enter as
    their AE, the rest clean; the defense runs on the whole batch.

    Args:
        defense: a :class:`~dad.defense.DADDefense`.
        clean, adv: clean images and their AEs, aligned with ``y``.
        y: labels.
        fraction: share of AEs per batch, in [0, 1].
        batch_size: images per batch (<= number of samples).
        num_batches: batches drawn.
        generator: CPU generator of the draws.
        seed: seed of the defense's noise (see :func:`seeded`).

    Returns:
        ``detection_rate`` (flagged batches), ``acc_clean_part``, ``acc_adv_part`` (None where a part is
        empty), ``acc_all``, ``adv_per_batch``, ``batches``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"Expected `fraction` in [0, 1], got {fraction}")
    if not 2 <= batch_size <= len(y):
        raise ValueError(f"Expected `batch_size` in [2, {len(y)}], got {batch_size}")
    n_adv = round(fraction * batch_size)
    flagged = right_clean = right_adv = 0
    with seeded(seed, clean):
        for _ in range(num_batches):
            draw = torch.randperm(len(y), generator=generator)[:batch_size].to(y.device)  # cpu: reproducible draws
            a, c = draw[:n_adv], draw[n_adv:]
            out = defense.forward_with_info(torch.cat([adv[a], clean[c]]))
            correct = out.logits.argmax(1) == torch.cat([y[a], y[c]])
            flagged += int(out.adversarial)
            right_adv += int(correct[:n_adv].sum())
            right_clean += int(correct[n_adv:].sum())
    n_clean = batch_size - n_adv
    return {
        "detection_rate": flagged / num_batches,
        "acc_clean_part": right_clean / (n_clean * num_batches) if n_clean else None,
        "acc_adv_part": right_adv / (n_adv * num_batches) if n_adv else None,
        "acc_all": (right_clean + right_adv) / (batch_size * num_batches),
        "adv_per_batch": n_adv,
        "batches": num_batches,
    }
