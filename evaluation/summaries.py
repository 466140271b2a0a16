"""The report's pieces computed from the evaluated states: detection metrics, accuracies with their intervals,
mixed-batch entries, the purifier's settings, the stages' timings, and the plots."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from callbacks import log_figures
from dad.attacks import AttackSpec
from dad.attacks.budget import budget_passes
from dad.defense import DADDefense
from dad.metrics import auroc, roc_curve
from dad.stats import paired_difference_interval
from evaluation import plots
from evaluation.analysis import detection_metrics, sample_detection, summary
from evaluation.context import Context
from evaluation.state import AttackState
from lightning_modules.evaluator import CLEAN
from pipeline.paths import STAGES, RunPaths

__all__ = ["detection_summary", "write_plots", "accuracies", "mixed_entry", "purifier_summary", "stage_timings",
           "attack_cost"]

Scores = dict[int, Tensor]
"""Batch scores per batch size."""


def detection_summary(ctx: Context, states: Mapping[str, AttackState], threats: Mapping[str, str],
                      results: Mapping[str, Any]) -> tuple[dict[str, Any], Scores, dict[str, Scores]]:
    """Detection metrics per batch size; also returns the clean and adversarial batch scores drawn."""
    detector = ctx.defense.detector
    b, n_random = ctx.batch_size, ctx.cfg.eval.random_batches
    clean = states[CLEAN].gather("x_adv").to(ctx.device)
    sizes = sorted({s for s in [*ctx.cfg.eval.detection_batch_sizes, b] if 2 <= s <= len(clean)})
    pools = {name: states[name].gather("x_adv").to(ctx.device) for name, t in threats.items() if t != "defense"}
    attacked = {name: states[name].per_batch("score") for name, t in threats.items() if t == "defense"}
    by_size, clean_scores, attack_scores = detection_metrics(
        ctx.defense, clean, ctx.y[: len(clean)].to(ctx.device), ctx.fpr_pool.to(ctx.device), pools, attacked, sizes,
        b, n_random)
    per_sample = (sample_detection(ctx.defense, ctx.fpr_pool.to(ctx.device), pools)
                  if ctx.defense.sample_detector is not None and ctx.defense.sample_detector.calibrated else None)
    threshold = detector.threshold_for(b).item()
    detection = {
        "threshold": threshold,
        "target_fpr": ctx.defense.target_fpr,
        "batch_size": b,
        "fpr_clean": by_size[str(b)]["fpr_clean"],
        "fpr_clean_sequential": results[CLEAN]["detection_rate"],
        "random_batches": n_random,
        "clean_pool": len(ctx.fpr_pool),
        "tpr": {name: results[name]["detection_rate"] for name in threats},
        "tpr_random_batches": {name: by_size[str(b)]["tpr"][name] for name in pools},
        "auroc": {name: {str(s): by_size[str(s)]["auroc"][name] for s in sizes if name in by_size[str(s)]["auroc"]}
                  for name in threats},
        "by_batch_size": by_size,
        "per_sample": per_sample,
    }
    return detection, clean_scores, attack_scores


def write_plots(ctx: Context, states: Mapping[str, AttackState], report: dict[str, Any],
                clean_scores: dict[int, Tensor], attack_scores: dict[str, dict[int, Tensor]],
                num_classes: int) -> dict[str, str]:
    """Write the PNG plots into ``<run>/plots`` and log the same figures to TensorBoard."""
    b = ctx.batch_size
    figures = {}
    at_b = {name: scores[b] for name, scores in attack_scores.items() if b in scores}
    figures["roc"] = plots.roc_figure({name: (*roc_curve(clean_scores[b], s), auroc(clean_scores[b], s))
                                       for name, s in at_b.items()}, b)
    figures["mmd_histogram"] = plots.score_histogram_figure(clean_scores[b], at_b, report["detection"]["threshold"], b)
    sweep = report.get("sweep") or {}
    if sweep:
        figures["accuracy_vs_eps"] = plots.accuracy_vs_eps_figure(sweep["eps"], {
            "undefended (classifier-only PGD)": sweep["undefended"],
            "DAD, classifier-only PGD": sweep["dad_classifier_only"],
            f"DAD, {sweep['attack']} (full white box)": sweep["dad_white_box"],
        }, 1.0 / num_classes, sweep["norm"])
    mixed = report["mixed"]
    if mixed:
        by_attack: dict[str, dict[float, dict[str, Any]]] = {}
        for entry in mixed.values():
            by_attack.setdefault(entry["attack"], {})[entry["fraction"]] = entry
        fractions = sorted({p for rows in by_attack.values() for p in rows})
        rows = {f"{attack}: {key}": [by_attack[attack].get(p, {}).get(key) for p in fractions]
                for attack in by_attack for key in ("detection_rate", "dad")}
        figures["mixed_batches"] = plots.mixed_batches_figure(fractions, rows, ", ".join(by_attack))
    shown = (sweep.get("attack") if sweep else None) or next(iter(at_b), None)
    if shown is not None:
        adv = states[shown].batches[0]["x_adv"][:8]
        with torch.no_grad():
            denoised = ctx.defense.purify(adv.to(ctx.device)).cpu()
        figures["images"] = plots.image_grid_figure(
            {"clean": ctx.x[: len(adv)], "adversarial": adv, "denoised": denoised},
            f"{shown}: clean / AE / denoised AE")
    written = {}
    for tag, fig in figures.items():
        path = ctx.output("plots") / f"{tag}.png"
        plots.save_figure(fig, path)
        written[tag] = str(path.relative_to(ctx.paths.root))
    log_figures(ctx.logger, {f"eval/{tag}": fig for tag, fig in figures.items()})
    return written


def accuracies(states: Mapping[str, AttackState], results: Mapping[str, Any], name: str) -> dict[str, Any]:
    """DAD, the undefended classifier and the denoiser path under one attack, with intervals and the paired
    difference DAD - undefended."""
    dad, undefended = states[name].gather("dad"), states[name].gather("undefended")
    entry = {key: results[name][key] for key in ("undefended", "dad", "dad_mean", "denoised")}
    return {**entry, "n": dad.numel(), "dad_ci95": summary(dad)["ci95"],
            "undefended_ci95": summary(undefended)["ci95"],
            "dad_minus_undefended": list(paired_difference_interval(dad, undefended))}


def mixed_entry(state: AttackState, result: Mapping[str, Any], attack: str, share: float,
                threat: str) -> dict[str, Any]:
    """A mixed-batch attack: AE-part accuracy (every draw right) with its interval, detection and filler accuracy."""
    part = summary(state.gather("dad"))
    return {"attack": attack, "fraction": share, "threat": threat, "dad": part["dad"], "dad_ci95": part["ci95"],
            "n": part["n"], "dad_mean": result["dad_mean"], "detection_rate": result["detection_rate"],
            "filler_acc": float(state.per_batch("filler_acc").mean())}


def purifier_summary(defense: DADDefense) -> dict[str, Any] | None:
    """The purifier's settings without its networks' architecture (None for DAD's own noise and denoiser)."""
    spec = defense.purifier.spec()
    if spec["kind"] == "denoiser":
        return None
    return {k: v for k, v in spec.items() if k not in ("score_net", "schedule", "denoiser")}


def stage_timings(paths: RunPaths) -> dict[str, float]:
    timings = {}
    for stage in STAGES:
        done = paths.done(stage)
        if done.is_file():
            timings[stage] = json.loads(done.read_text()).get("seconds")
    return timings


def attack_cost(specs: Mapping[str, AttackSpec], states: Mapping[str, AttackState]) -> dict[str, dict[str, Any]]:
    """Per attack through the defense (``specs``: whole-batch and mixed attacks by name), per defense batch: the
    passes of the defense its whole budget costs in the reference loop (``budget_passes``, :mod:`dad.attacks.budget`),
    the passes it made and the tensor programs that made them (batched runs, early stops: :mod:`dad.runs`), and the
    share of its defense batches whose attack stopped early."""
    cost = {}
    for name, spec in specs.items():
        state = states[name]
        if spec.threat != "defense" or not state.batches:
            continue
        batches = state.per_batch("batches").sum().item()
        cost[name] = {"budget_passes": budget_passes(spec),
                      **{key: state.per_batch(key).sum().item() / batches for key in ("passes", "programs")},
                      "stopped_early": state.per_batch("stops").sum().item() / batches}
    return cost
