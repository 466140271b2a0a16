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
from typing import Literal, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks.common import check_positive
from dad.attacks.spec import DEFENSE_OBJECTIVES
from dad.defense_runs import KnownRows, classify_runs, forward_runs, is_runs, per_run, stack_rows
from dad.routing import Detection
from dad.runs import record_passes, run_chunks, run_settings

__all__ = ["Loss", "Losses", "Weights", "LOSS_KINDS", "PerSample", "classification_loss", "DefenseObjective",
           "defense_objective", "excesses_per_image", "largest_excess", "per_draw_loss"]

Loss = Literal["ce", "dlr"]
Losses = Union[Loss, Sequence[Loss]]
"""One loss kind, or one per run of a stack of runs (:mod:`dad.defense_runs`)."""
Weights = Union[float, Sequence[float]]
"""One penalty weight, or one per run of a stack of runs."""
LOSS_KINDS: tuple[str, ...] = ("ce", "dlr")
PerSample = Callable[[Tensor], Tensor]
"""``objective(x_adv)`` -> per-sample values ``(n,)`` to maximise (their sum is the batch objective)."""

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


class DefenseObjective:
    """The per-sample values an attack through the defense maximises (see the module docstring), one draw of the
    defense's randomness per call, or ``count`` independent draws at once (:meth:`draws`, what EOT averages).

    Batched (:mod:`dad.runs`), the draws share the deterministic part (the classifier's pass on the batch, the
    detectors) and only purify-and-classify runs per draw, as one batch; the clean filler's classifier pass is
    made once for the whole attack (:class:`~dad.defense.KnownRows`) and only the attacked images are purified
    (the loss counts them only). Looped, every draw is the whole computation on the whole batch, as one call each.

    Args:
        defense: a calibrated :class:`~dad.defense.DADDefense`.
        y: true labels of the attacked images; ``(G, n)`` for ``G`` independent batches (the groups of a
            mixed-batch attack), attacked as a group-major stack of runs (:func:`~dad.defense_runs.per_run`).
        objective: one of :data:`~dad.attacks.spec.DEFENSE_OBJECTIVES`.
        lam: weight of the MMD term (``adaptive``), of the EPS norm (``evade_eps``) or of the hinge on the
            detector's score (>= 0).
        loss: the classification term, ``ce`` or ``dlr``.
        temperature: width of the sigmoid relaxation, relative to the threshold (> 0).
        margin: how far below (clean path) or above (denoiser path) the threshold the hinge aims.
        filler: clean images in the same batch (mixed batches), ``(G, m, ...)`` for groups; None: the attacked
            images are the batch.
    """

    def __init__(self, defense: nn.Module, y: Tensor, objective: str, lam: Weights, loss: Losses = "ce",
                 temperature: float = 0.1, margin: float = 0.1, filler: Tensor | None = None) -> None:
        if objective not in DEFENSE_OBJECTIVES:
            raise ValueError(f"Expected `objective` in {DEFENSE_OBJECTIVES}, got {objective!r}")
        if min(lam) < 0 if isinstance(lam, Sequence) else lam < 0:
            raise ValueError(f"Expected `lam` >= 0, got {lam}")
        check_positive("temperature", temperature)
        self.defense, self.y, self.objective, self.lam, self.loss = defense, y, objective, lam, loss
        self.temperature, self.margin, self.filler = temperature, margin, filler
        self.known = defense.known_rows(filler) if filler is not None and run_settings().batched else None
        self._lams: Tensor | None = None  # per-run weights on the device, made once

    def __call__(self, x_adv: Tensor) -> Tensor:
        """Per-sample values ``(n,)`` under one draw of the defense's randomness."""
        return self.draws(x_adv, 1)[0]

    def draws(self, x_adv: Tensor, count: int) -> Tensor:
        """Per-sample values under ``count`` independent draws, shape ``(count, n)``; for runs ``x_adv`` of shape
        ``(R, n, ...)`` (batched only, :mod:`dad.defense_runs`), ``(count, R, n)``."""
        if not run_settings().batched:
            return torch.stack([self._values(x_adv, 1, None)[0] for _ in range(count)])
        return self._values(x_adv, count, self.known)

    def _values(self, x_adv: Tensor, count: int, known: KnownRows | None) -> Tensor:
        runs = is_runs(self.defense, x_adv)
        values = self._run_values(x_adv if runs else x_adv[None], count, known)
        return values if runs else values[:, 0]

    def _run_values(self, x: Tensor, count: int, known: KnownRows | None) -> Tensor:
        """Values ``(count, R, n)`` of the runs ``x`` ``(R, n, ...)``, each run its own batch (one batch: R = 1)."""
        defense, y, loss, (r, n) = self.defense, self.y, self.loss, x.shape[:2]
        x = stack_rows(x, self.filler if known is None else None)  # looped: the filler passed with every call
        if self.objective in ("adaptive", "evade_eps"):
            out = forward_runs(defense, x, count, known, first=n)
            values = per_draw_loss(out.logits, y, loss)
            if self.objective == "adaptive":
                return values + self._weighted(out.score)[..., None]
            if r > 1:
                raise ValueError("The evade_eps objective takes one batch at a time, not a stack of runs")
            purifier = getattr(defense, "purifier", None)  # lower what the purifier keys on, where it keys on one
            whole = stack_rows(x, None if known is None else known.images)[0]
            term = purifier.adaptive_term(whole) if purifier is not None else None
            return values if term is None else values - self._weighted(term[:n])
        # the passes of the defense this makes (adaptive and evade_eps count theirs in forward_runs)
        chunks = 1 if self.objective == "evade_clean" else len(run_chunks(count, r * x.shape[1], x[0, 0]))
        record_passes(count * r, chunks)
        logits_clean, features = classify_runs(defense, x, known)
        full = stack_rows(x, None if known is None else known.images)  # each run's whole batch
        excesses = excesses_per_image(defense.detect(full, features), n)
        logits_clean = logits_clean[:, :n]
        if self.objective == "evade_clean":
            hinge = sum(F.relu(e + self.margin) for e in excesses)
            return (per_draw_loss(logits_clean[None], y, loss)[0] - self._weighted(hinge)).expand(count, r, n)
        purified = defense.purify_runs(x.flatten(0, 1), count)
        logits_denoised = defense.logits_of_runs(purified).view(count, r, x.shape[1], -1)[:, :, :n]
        if self.objective == "evade_denoised":  # flagged by any test is enough
            flagged = F.relu(self.margin - largest_excess(excesses))
            return per_draw_loss(logits_denoised, y, loss) - self._weighted(flagged)
        passes = [1.0 - torch.sigmoid(e / self.temperature) for e in excesses]
        soft = 1.0 - torch.stack(torch.broadcast_tensors(*passes)).prod(0)
        p = soft if self.objective == "evade_soft" else (largest_excess(excesses) > 0).to(soft) + soft - soft.detach()
        probs = (1.0 - p)[..., None] * logits_clean.softmax(-1) + p[..., None] * logits_denoised.softmax(-1)
        hinge = sum(F.relu(e + self.margin) for e in excesses)
        return per_draw_loss(probs.clamp_min(_TINY).log(), y, loss) - self._weighted(hinge)

    def _weighted(self, term: Tensor) -> Tensor:
        """``lam`` times a per-run (``(R,)`` or ``(R, n)``) or a single batch's term: each run its own weight."""
        if not isinstance(self.lam, Sequence):
            return self.lam * term
        if self._lams is None:
            self._lams = torch.tensor(self.lam, dtype=term.dtype, device=term.device)
        return self._lams.view(-1, *([1] * (term.dim() - 1))) * term


def defense_objective(defense: nn.Module, y: Tensor, objective: str, lam: Weights, loss: Losses = "ce",
                      temperature: float = 0.1, margin: float = 0.1, filler: Tensor | None = None) -> DefenseObjective:
    """The :class:`DefenseObjective` of these settings (the arguments are its own)."""
    return DefenseObjective(defense, y, objective, lam, loss, temperature, margin, filler)


def per_draw_loss(logits: Tensor, y: Tensor, loss: Losses) -> Tensor:
    """:func:`classification_loss` of logits ``(D, n, K)`` per draw, shape ``(D, n)``; of runs' logits ``(D, R, n, K)``,
    shape ``(D, R, n)``, with one loss kind for all runs or one per run (``loss`` a sequence of ``R`` kinds), and the
    labels ``y`` ``(n,)`` of every run or ``(G, n)`` of each group of runs (:func:`~dad.defense_runs.per_run`)."""
    if y.dim() == 2:
        y = per_run(y, logits.shape[1])
    if not isinstance(loss, str):
        return torch.stack([per_draw_loss(logits[:, r], y[r] if y.dim() == 2 else y, kind)
                            for r, kind in enumerate(loss)], 1)
    labels = y.flatten().repeat(logits[..., 0].numel() // y.numel())
    return classification_loss(logits.reshape(-1, logits.shape[-1]), labels, loss).view(logits.shape[:-1])


def excesses_per_image(detection: Detection, n: int) -> list[Tensor]:
    """The relative excesses of the tests in force, per attacked image: the batch's (shared) and each image's."""
    found = []
    if detection.batch_excess is not None:  # a batch's () or runs' (R,): per image (n,) or (R, n)
        found.append(detection.batch_excess[..., None].expand(*detection.batch_excess.shape, n))
    if detection.sample_excess is not None:
        found.append(detection.sample_excess[..., :n])
    return found


def largest_excess(excesses: list[Tensor]) -> Tensor:
    """Per image, the largest relative excess of the tests in force: above 0, the image is purified."""
    return torch.stack(excesses).amax(0)
