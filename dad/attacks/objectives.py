"""What attacks through the whole :class:`~dad.defense.DADDefense` maximise, and how their candidates are judged.

DAD routes what its detectors flag through noise, denoiser and classifier, the rest straight to the
classifier: whole batches (``batch`` routing), single images (``sample``) or both (:mod:`dad.routing`).
The objectives (``objective`` of an :class:`~dad.attacks.AttackSpec`) know the routing in force and its
detection statistics, through the relative excess ``(score - threshold) / |threshold|`` of each test
(the batch's, and each image's own):

* ``adaptive``: the published attack, the loss of the defended output (hard routing, EOT over the noise)
  plus ``lam`` times the detection statistic. Note that this term pushes the input *into* the detector
  (towards the denoiser); the evasion objectives below go the other way or cross the routing.
* ``evade_clean``: fool the classifier alone while hinges ``lam * relu(excess + margin)`` drive every test
  in force below its threshold (the batch's, and each attacked image's own), so the denoiser is never used;
* ``evade_denoised``: fool the denoiser path (EOT over its noise) while keeping the input flagged;
* ``evade_eps`` (diffusion purification with SSNI): the adaptive attack's loss minus ``lam`` times the
  standardised EPS norm ``(||EPS(x)|| - mu) / tau`` of the SSNI purifier, the quantity SSNI keys on (the
  analogue of detector evasion: an AE that looks clean to SSNI gets a small timestep, hence little noise); the
  gradient also flows through the continuous timestep ``t(x)`` into the reverse process. On a defense without
  an SSNI purifier the EPS term is absent and the objective is ``adaptive`` without its MMD term;
* ``evade_soft`` / ``evade_bpda``: cross the hard routing decision, which has no gradient, with a relaxation
  ``p = sigmoid(excess / temperature)`` per test (an image is purified unless every test passes it,
  ``p = 1 - prod(1 - p_test)``) mixing both paths' probabilities (Athalye et al. 2018,
  https://arxiv.org/abs/1802.00420): ``soft`` uses ``p`` forward and backward, ``bpda`` the hard decision
  forward and the sigmoid's gradient backward (so the loss value is the real one).

Every objective returns per-sample values: the sample's classification term plus the batch term (the MMD
term or the hinge) in full, so the batch objective is ``B`` times the mean loss plus the batch term (a
weight ``lam`` means the same against the mean loss at any batch size) and step-size rules that act per
sample (APGD) see both. The classification term is the
cross-entropy (``ce``) or the difference-of-logits ratio (``dlr``, Croce & Hein 2020), which is invariant
to shifting and scaling the logits and so does not saturate on confident models.

Mixed batches: given ``filler`` (clean images the defense sees in the same batch), the attacker perturbs
only its own images ``x``; the defense scores and routes the whole batch ``cat(x, filler)`` and the loss
counts the attacked images only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks.common import check_at_least_one, check_positive
from dad.attacks.spec import DEFENSE_OBJECTIVES
from dad.routing import Detection

__all__ = [
    "Loss", "LOSS_KINDS", "PerSample", "Judge", "classification_loss", "defense_objective", "error_rates",
    "strongest_batch", "with_filler", "judged_steps",
]

Loss = Literal["ce", "dlr"]
LOSS_KINDS: tuple[str, ...] = ("ce", "dlr")
PerSample = Callable[[Tensor], Tensor]
"""``objective(x_adv)`` -> per-sample values ``(n,)`` to maximise (their sum is the batch objective)."""
Judge = Callable[[Tensor], Tensor]
"""``judge(x_adv)`` -> per-sample error rates ``(n,)`` of the real defense on the whole batch ``x_adv``."""

_TINY = 1e-12


def classification_loss(logits: Tensor, y: Tensor, kind: Loss = "ce") -> Tensor:
    """Per-sample untargeted loss to maximise: cross-entropy, or DLR ``-(z_y - max_{j!=y} z_j) / (z_1 - z_3)``.

    ``z_1 >= z_2 >= z_3`` are the largest logits (DLR needs at least 3 classes); log-probabilities are valid
    logits for both, so mixed path probabilities can be passed through ``log``.
    """
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if kind != "dlr":
        raise ValueError(f"Expected a loss in {LOSS_KINDS}, got {kind!r}")
    if logits.shape[1] < 3:
        raise ValueError(f"The DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -(true - others) / (top[:, 0] - top[:, 2] + _TINY)


def with_filler(x: Tensor, filler: Tensor | None) -> Tensor:
    """The batch the defense sees: the attacked images, then the clean filler (if any)."""
    return x if filler is None else torch.cat([x, filler.to(x)])


def defense_objective(
    defense: nn.Module,
    y: Tensor,
    objective: str,
    lam: float,
    loss: Loss = "ce",
    temperature: float = 0.1,
    margin: float = 0.1,
    filler: Tensor | None = None,
) -> PerSample:
    """The per-sample values an attack through the defense maximises (see the module docstring).

    Args:
        defense: a calibrated :class:`~dad.defense.DADDefense`.
        y: true labels of the attacked images.
        objective: one of :data:`~dad.attacks.spec.DEFENSE_OBJECTIVES`.
        lam: weight of the MMD term (``adaptive``), of the EPS norm (``evade_eps``) or of the hinge on the
            detector's score (>= 0).
        loss: the classification term, ``ce`` or ``dlr``.
        temperature: width of the sigmoid relaxation, relative to the threshold (> 0).
        margin: how far below (clean path) or above (denoiser path) the threshold the hinge aims.
        filler: clean images in the same batch (mixed batches); None: the attacked images are the batch.
    """
    if objective not in DEFENSE_OBJECTIVES:
        raise ValueError(f"Expected `objective` in {DEFENSE_OBJECTIVES}, got {objective!r}")
    if lam < 0:
        raise ValueError(f"Expected `lam` >= 0, got {lam}")
    check_positive("temperature", temperature)

    def value(x_adv: Tensor) -> Tensor:
        n = len(x_adv)
        batch = with_filler(x_adv, filler)
        if objective == "adaptive":
            out = defense.forward_with_info(batch)
            return classification_loss(out.logits[:n], y, loss) + lam * out.score
        if objective == "evade_eps":  # lower what the purifier keys on, where it keys on something
            out = defense.forward_with_info(batch)
            purifier = getattr(defense, "purifier", None)
            term = purifier.adaptive_term(batch) if purifier is not None else None
            if term is None:
                return classification_loss(out.logits[:n], y, loss)
            return classification_loss(out.logits[:n], y, loss) - lam * term[:n]
        logits_clean, features = defense.classify_with_features(batch)
        excesses = _excesses(defense.detect(batch, features), n)
        if objective == "evade_clean":
            hinge = sum(F.relu(e + margin) for e in excesses)
            return classification_loss(logits_clean[:n], y, loss) - lam * hinge
        logits_denoised = defense.classifier(defense.purify(batch))
        if objective == "evade_denoised":  # flagged by any test is enough
            return classification_loss(logits_denoised[:n], y, loss) - lam * F.relu(margin - _largest(excesses))
        passes = [1.0 - torch.sigmoid(e / temperature) for e in excesses]
        soft = 1.0 - torch.stack(torch.broadcast_tensors(*passes)).prod(0)
        p = soft if objective == "evade_soft" else (_largest(excesses) > 0).to(soft) + soft - soft.detach()
        probs = (1.0 - p)[:, None] * logits_clean[:n].softmax(1) + p[:, None] * logits_denoised[:n].softmax(1)
        hinge = sum(F.relu(e + margin) for e in excesses)
        return classification_loss(probs.clamp_min(_TINY).log(), y, loss) - lam * hinge

    return value


def _excesses(detection: Detection, n: int) -> list[Tensor]:
    """The relative excesses of the tests in force, per attacked image: the batch's (shared) and each image's."""
    found = []
    if detection.batch_excess is not None:
        found.append(detection.batch_excess.expand(n))
    if detection.sample_excess is not None:
        found.append(detection.sample_excess[:n])
    return found


def _largest(excesses: list[Tensor]) -> Tensor:
    return torch.stack(excesses).amax(0)


@torch.no_grad()
def error_rates(model: nn.Module, x: Tensor, y: Tensor, draws: int = 1, filler: Tensor | None = None) -> Tensor:
    """Per-sample misclassification rate of ``model`` on the whole batch ``cat(x, filler)`` over ``draws`` passes.

    A model with ``forward_draws`` (:meth:`~dad.defense.DADDefense.forward_draws`) makes all draws in one call,
    drawing only its random part again.
    """
    check_at_least_one("draws", draws)
    batch = with_filler(x, filler)
    if hasattr(model, "forward_draws"):
        logits = model.forward_draws(batch, draws).logits
    else:
        logits = torch.stack([model(batch) for _ in range(draws)])
    return (logits[:, : len(y)].argmax(2) != y).float().mean(0)


def judged_steps(steps: int, every: int = 10) -> set[int]:
    """The iterations (counted from 1) after which an attack judges its current batch: about ``every`` of them
    spread over the run, the last one included. Judging costs ``draws`` passes of the defense, several times a
    gradient step's cost, so attacks judge a sample of their iterates rather than all of them.

    >>> sorted(judged_steps(20))
    [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    """
    stride = max(1, steps // every)
    return {k for k in range(1, steps + 1) if k % stride == 0} | {steps}


def strongest_batch(judge: Judge, candidates: Sequence[Tensor]) -> Tensor:
    """The candidate batch the defense gets most wrong, or a per-sample mix of them if that is stronger.

    Every candidate is a whole batch of AEs for the same clean batch, judged whole (``judge``); the mix
    takes, per sample, the candidate it is most often misclassified in (the best batch on ties) and is
    itself judged whole. The batch with the highest total error wins (the earlier one on ties): per-sample
    worst cases are kept without ever scoring an image outside a real batch.
    """
    if not candidates:
        raise ValueError("Expected at least one candidate batch")
    if len(candidates) == 1:
        return candidates[0]
    rates = torch.stack([judge(c) for c in candidates])
    order = rates.sum(1).argsort(descending=True, stable=True)
    stacked = torch.stack(list(candidates))[order]
    pick = rates[order].argmax(0)
    mixed = stacked[pick, torch.arange(stacked.shape[1], device=pick.device)]
    if judge(mixed).sum() > rates[order[0]].sum():
        return mixed
    return stacked[0]
