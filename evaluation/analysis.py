"""What an evaluation's records say: worst cases per threat model, detection metrics, the FPR check.

Pure functions of the attacks' per-sample records and the defense (no Trainer, no files): the runner
(:mod:`evaluation.runner`) produces the records, the report (:mod:`evaluation.report`) prints these results.
Every accuracy comes with its 95% Wilson interval (:mod:`dad.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn

from dad.attacks import AttackSpec
from dad.metrics import auroc, batched_predictions, rate_above, worst_case
from dad.routing import Router
from dad.sanity import CheckResult
from dad.stats import accuracy_interval

__all__ = [
    "fraction", "summary", "pop_samples", "SAMPLES", "threat_label", "threat_groups", "union", "worst_cases",
    "detection_metrics", "fpr_check", "sample_detection",
]

SAMPLES = "samples"
"""The key of a worst case's per-sample correctness (saved beside the report, not in it)."""


def fraction(correct: Tensor) -> float:
    """Share of True values (NaN for an empty vector)."""
    return correct.double().mean().item() if correct.numel() else float("nan")


def summary(correct: Tensor) -> dict[str, Any]:
    """``{"dad", "ci95", "n"}``: the accuracy of DAD's per-sample correctness, its 95% interval and sample count."""
    return {"dad": fraction(correct), "ci95": list(accuracy_interval(correct)), "n": correct.numel()}


def _with_samples(correct: Tensor) -> dict[str, Any]:
    """:func:`summary` plus the per-sample correctness itself (``samples``), for paired comparisons of reports."""
    return {**summary(correct), SAMPLES: correct.bool().cpu()}


def pop_samples(tree: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """``tree`` without its ``samples`` entries, and those entries by their path (``a/b/samples``)."""
    if not isinstance(tree, dict):
        return tree, {}
    kept, found = {}, {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key == SAMPLES and isinstance(value, Tensor):
            found[path] = value
            continue
        kept[key], inner = pop_samples(value, path + "/")
        found |= inner
    return kept, found


def threat_label(spec: AttackSpec) -> str:
    """The threat model of an attack, e.g. ``linf eps=0.2``."""
    return f"{spec.norm} eps={spec.eps:.4g}"


def threat_groups(specs: Mapping[str, AttackSpec], threats: Mapping[str, str]) -> dict[str, dict[str, list[str]]]:
    """Attack names per threat model (norm, eps), split into full-white-box (``defense``) and ``classifier`` ones."""
    groups: dict[str, dict[str, list[str]]] = {}
    for name, spec in specs.items():
        if threats[name] in ("defense", "classifier"):
            groups.setdefault(threat_label(spec), {"defense": [], "classifier": []})[threats[name]].append(name)
    return groups


def union(correct: Sequence[Tensor]) -> Tensor:
    """Per-sample worst case over attacks evaluated on prefixes of the test split (the shortest prefix common to
    all): a sample counts as robust only if every attack left it correct."""
    n = min(c.numel() for c in correct)
    return worst_case([c[:n] for c in correct])


def worst_cases(specs: Mapping[str, AttackSpec], threats: Mapping[str, str], dad: Mapping[str, Tensor],
                undefended: Mapping[str, Tensor], mixed: Mapping[str, tuple[str, float]],
                folded: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The worst cases of each threat model (norm, eps) and its headline.

    Args:
        specs, threats: every whole-batch attack (transfer ones included) and its threat.
        dad, undefended: per-sample correctness of DAD (in every draw) and of the classifier alone.
        mixed: mixed-batch attacks, ``name -> (whole-batch attack it runs, fraction)``; their ``dad`` entries
            are the AE-part correctness.
        folded: per threat model, the sanity re-runs' union on their subset (``{"correct", "attacks",
            "extra_errors"}``), folded into the headline where the stronger attacks found more errors.

    Returns:
        Per threat model: ``white_box``, ``classifier_only`` and ``all_attacks`` unions (per-sample worst cases
        over whole-batch attacks; a white-box attacker may submit any of these AEs), each mixed attack's
        AE-part accuracy, the folded subset figure, and ``headline`` (the lowest of them) and
        ``headline_whole_batch`` (the lowest without the mixed batches); each with its per-sample correctness
        under ``samples`` (:func:`pop_samples` takes them out before the report is written).
    """
    out: dict[str, Any] = {}
    for label, members in threat_groups(specs, threats).items():
        first = specs[(members["defense"] or members["classifier"])[0]]
        entry: dict[str, Any] = {"norm": first.norm, "eps": first.eps, "white_box": None, "classifier_only": None}
        if members["defense"]:
            entry["white_box"] = {**_with_samples(union([dad[n] for n in members["defense"]])),
                                  "attacks": members["defense"]}
        if members["classifier"]:
            entry["classifier_only"] = {**_with_samples(union([dad[n] for n in members["classifier"]])),
                                        "undefended": fraction(union([undefended[n] for n in members["classifier"]])),
                                        "attacks": members["classifier"]}
        everything = [n for n, s in specs.items() if threat_label(s) == label]
        entry["all_attacks"] = {**_with_samples(union([dad[n] for n in everything])), "attacks": everything}
        entry["mixed"] = {name: {**_with_samples(dad[name]), "attack": base, "fraction": p}
                          for name, (base, p) in mixed.items() if threat_label(specs[base]) == label}
        candidates = {"all_attacks": entry["all_attacks"]}
        if label in folded:
            fold = folded[label]
            entry["folded"] = {**_with_samples(fold["correct"]), "attacks": fold["attacks"],
                               "extra_errors": fold["extra_errors"]}
            if fold["extra_errors"] > 0:
                candidates["folded"] = entry["folded"]
        whole = min(candidates, key=lambda k: candidates[k]["dad"])
        entry["headline_whole_batch"] = {**candidates[whole], "source": whole}
        candidates |= {f"mixed:{name}": value for name, value in entry["mixed"].items()}
        lowest = min(candidates, key=lambda k: candidates[k]["dad"])
        entry["headline"] = {**candidates[lowest], "source": lowest}
        out[label] = entry
    return out


def detection_metrics(
    defense: nn.Module,
    clean: Tensor,
    labels: Tensor,
    fpr_pool: Tensor,
    pools: Mapping[str, Tensor],
    attacked_scores: Mapping[str, Tensor],
    sizes: Sequence[int],
    batch_size: int,
    num_batches: int,
) -> tuple[dict[str, Any], dict[int, Tensor], dict[str, dict[int, Tensor]]]:
    """Detection metrics per batch size: threshold, clean FPR, AUROC and TPR per attack, whole-batch accuracies.

    Args:
        defense: the :class:`~dad.defense.DADDefense`.
        clean: the attacked clean test images; ``labels`` their labels.
        fpr_pool: every clean test image (clean batches cost no attack, so the FPR is measured on all of them:
            a larger pool sits closer to the population, its offset scaling as 1/sqrt(size)).
        pools: AEs of the attacks whose AEs do not depend on their batch (threat ``classifier``, transfer),
            scored on random batches of every size.
        attacked_scores: batch scores of the attacks made for their own batches (threat ``defense``): only the
            attacked batches are valid draws, at the evaluation batch size.
        sizes: the batch sizes; ``batch_size`` the evaluation's; ``num_batches`` random batches per size.

    Returns:
        ``(by_size, clean_scores, attack_scores)``: the metrics per batch size, and the scores drawn.
    """
    detector = defense.detector
    calibrated = set(detector.batch_sizes.tolist())
    clean_scorer = detector.batch_scorer(fpr_pool)
    clean_scores = {s: clean_scorer(s, num_batches, torch.Generator().manual_seed(s)).cpu() for s in sizes}
    attack_scores: dict[str, dict[int, Tensor]] = {name: {batch_size: s} for name, s in attacked_scores.items()}
    for name, pool in pools.items():
        scorer = detector.batch_scorer(pool)
        attack_scores[name] = {s: scorer(s, num_batches, torch.Generator().manual_seed(10_000 + s)).cpu()
                               for s in sizes}
    by_size: dict[str, Any] = {}
    for s in sizes:
        entry: dict[str, Any] = {"calibrated": s in calibrated, "auroc": {}, "tpr": {}}
        if s in calibrated:
            threshold = detector.threshold_for(s).item()
            entry["threshold"] = threshold
            entry["fpr_clean"] = rate_above(clean_scores[s], threshold)
        for name, scores in attack_scores.items():
            if s in scores:
                entry["auroc"][name] = auroc(clean_scores[s], scores[s])
                if s in calibrated:
                    entry["tpr"][name] = rate_above(scores[s], entry["threshold"])
        if s in calibrated:  # whole-batch accuracy when the defense runs at this batch size
            entry["clean_acc_dad"] = fraction(batched_predictions(defense, clean, s)[0] == labels)
            entry["robust_acc_dad"] = {name: fraction(batched_predictions(defense, pool[: len(labels)], s)[0]
                                                      == labels[: len(pool)])
                                       for name, pool in pools.items()}
        by_size[str(s)] = entry
    return by_size, clean_scores, attack_scores


def fpr_check(measured: float, target: float, pool: int, calibration_pool: int, batch_size: int,
              router: Router, z: float = 2.0) -> tuple[CheckResult, dict[str, Any]]:
    """Does the share of clean images the defense purifies at the deployed batch size agree with the target FPR,
    within its noise?

    Two sources of noise, added in quadrature. The measurement's binomial error: on the ``pool // batch_size``
    *disjoint* clean batches the test pool holds for the batch test (random batches drawn from it overlap,
    so they carry no more information), on the ``pool`` images for the per-sample test. And the calibration
    pool's own error, which moves the threshold: for the batch test the pool's mean deviates from the
    population's by ``sqrt(B / N_cal)`` of a batch score's spread (the term the detector's finite-pool factor
    models), i.e. ``phi(q) sqrt(B / N_cal)`` in FPR at the ``q = Phi^-1(1 - fpr)`` quantile of a normal null;
    for the per-sample test an empirical quantile of ``N_cal`` scores, ``sqrt(fpr (1 - fpr) / N_cal)``. A
    routing that uses both tests adds the terms of its batch test (at ``router.batch_share`` of the target) and
    of its per-sample test (the rest).
    """
    disjoint = max(pool // batch_size, 1)
    routing = router.name
    batch_fpr = router.batch_share * target
    sample_fpr = (target - batch_fpr) / (1.0 - batch_fpr)
    binomial_sq = batch_fpr * (1 - batch_fpr) / disjoint + sample_fpr * (1 - sample_fpr) / max(pool, 1)
    calibration_sq = sample_fpr * (1 - sample_fpr) / max(calibration_pool, 1)
    if batch_fpr > 0:
        density = NormalDist().pdf(NormalDist().inv_cdf(1 - batch_fpr))
        calibration_sq += (density * math.sqrt(batch_size / max(calibration_pool, 1))) ** 2
    binomial, calibration = math.sqrt(binomial_sq), math.sqrt(calibration_sq)
    tolerance = z * math.sqrt(binomial_sq + calibration_sq)
    passed = abs(measured - target) <= tolerance
    detail = {"measured": measured, "target": target, "tolerance": tolerance, "disjoint_batches": disjoint,
              "se_binomial": binomial, "se_calibration": calibration, "calibration_pool": calibration_pool,
              "batch_size": batch_size, "routing": routing, "z": z,
              "formula": "|purified share - target| <= z * sqrt(p_b (1 - p_b) / floor(N_test / B) + "
                         "p_s (1 - p_s) / N_test + (phi(Phi^-1(1 - p_b)) sqrt(B / N_cal))^2 + p_s (1 - p_s) / N_cal)"
                         f" with p_b = {batch_fpr:.3g} (batch test) and p_s = {sample_fpr:.3g} (per-sample test)"}
    text = (f"clean images purified {measured:.4f} vs target {target:.3f} ({routing} routing, batch size "
            f"{batch_size}): tolerance {tolerance:.4f} = {z:g} x sqrt({binomial:.4f}^2 [binomial: {disjoint} "
            f"disjoint batches, {pool} images] + {calibration:.4f}^2 [calibration pool of {calibration_pool}])")
    return CheckResult(passed, text), detail


@torch.no_grad()
def sample_detection(defense: nn.Module, fpr_pool: Tensor, pools: Mapping[str, Tensor]) -> dict[str, Any]:
    """Per-sample detection: the clean images' FPR at the per-sample threshold, and per attack the AUROC of the
    per-sample scores (clean test images vs the attack's AEs) and the TPR at the threshold."""
    detector = defense.sample_detector

    def scores(images: Tensor) -> Tensor:
        return torch.cat([detector.scores(part) for part in images.split(256)]).cpu()

    clean = scores(fpr_pool)
    threshold = detector.threshold.item()
    out: dict[str, Any] = {"score": detector.kind, "threshold": threshold, "fpr_clean": rate_above(clean, threshold),
                           "auroc": {}, "tpr": {}}
    for name, pool in pools.items():
        adversarial = scores(pool)
        out["auroc"][name] = auroc(clean, adversarial)
        out["tpr"][name] = rate_above(adversarial, threshold)
    return out
