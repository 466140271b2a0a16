"""What an evaluation's records say: worst cases per threat model, detection metrics, mixed batches.

Pure functions of the attacks' per-sample records and the defense (no Trainer, no files): the runner
(:mod:`evaluation.runner`) produces the records, the report (:mod:`evaluation.report`) prints these results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dad.attacks import AttackSpec
from dad.metrics import auroc, batched_predictions, mixed_batch_rates, rate_above, worst_case

__all__ = ["fraction", "threat_label", "threat_groups", "worst_cases", "detection_metrics", "mixed_batches"]


def fraction(correct: Tensor) -> float:
    """Share of True values (NaN for an empty vector)."""
    return correct.double().mean().item() if correct.numel() else float("nan")


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


def worst_cases(specs: Mapping[str, AttackSpec], threats: Mapping[str, str],
                dad: Mapping[str, Tensor], undefended: Mapping[str, Tensor]) -> dict[str, Any]:
    """Per threat model (norm, eps): per-sample worst case over the full-white-box attacks, over the classifier-only
    ones, and over every attack of that threat model (transfer included: a white-box attacker may submit any of
    these AEs, so ``all_attacks`` is the tightest bound the evaluation gives)."""
    out: dict[str, Any] = {}
    for label, members in threat_groups(specs, threats).items():
        first = specs[(members["defense"] or members["classifier"])[0]]
        entry: dict[str, Any] = {"norm": first.norm, "eps": first.eps, "white_box": None, "classifier_only": None}
        if members["defense"]:
            entry["white_box"] = {"dad": fraction(worst_case([dad[n] for n in members["defense"]])),
                                  "attacks": members["defense"]}
        if members["classifier"]:
            entry["classifier_only"] = {
                "dad": fraction(worst_case([dad[n] for n in members["classifier"]])),
                "undefended": fraction(worst_case([undefended[n] for n in members["classifier"]])),
                "attacks": members["classifier"],
            }
        everything = [n for n, s in specs.items() if threat_label(s) == label]
        entry["all_attacks"] = {"dad": fraction(worst_case([dad[n] for n in everything])), "attacks": everything}
        entry["n"] = len(next(iter(dad.values())))
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
            entry["robust_acc_dad"] = {name: fraction(batched_predictions(defense, pool, s)[0] == labels)
                                       for name, pool in pools.items()}
        by_size[str(s)] = entry
    return by_size, clean_scores, attack_scores


def mixed_batches(defense: nn.Module, clean: Tensor, adv: Tensor, labels: Tensor, fractions: Sequence[float],
                  batch_size: int, num_batches: int, seed: int) -> dict[str, Any]:
    """Detection and accuracy on random batches mixing clean images with a fraction of AEs, per fraction."""
    b = min(batch_size, len(labels))
    generator = torch.Generator().manual_seed(seed)
    rows = {str(p): mixed_batch_rates(defense, clean, adv, labels, p, b, num_batches, generator) for p in fractions}
    return {"batch_size": b, "fractions": rows}
