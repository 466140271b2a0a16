"""Evaluate a saved defense the way a reviewer would: every threat model, converged attacks, sanity checks.

``evaluate(cfg)`` loads ``runs/<name>/defense.pt`` (or the run's ``eval.defense`` file, e.g. a diffusion
purifier's ``defense_ssni_n.pt``) and the test split and

1. runs the clean images, every classifier-only attack and the transfer attacks on the first ``max_test``
   test images, and every attack through the defense and every mixed-batch attack (an attacked image among
   clean filler, at each fraction of ``eval.mixed_fractions``) on the first ``max_test_defense``, batch by
   batch at the defense's batch size, through a :class:`~lightning_modules.evaluator.DefenseEvaluator`
   (a sample is robust only if the defense is right in every one of ``eval.draws`` noise draws); each
   attack's per-batch results are saved in ``eval_state/<attack>.pt`` and reused by a later run when the
   attack, the defense file and the data are unchanged (an interrupted evaluation resumes);
2. runs the sanity phase (:mod:`evaluation.sanity`): gradients, randomness and EOT, white box vs
   classifier-only, an eps sweep, more steps / EOT samples / restarts / draws of the strongest attack on
   ``eval.sanity_samples`` images (folded into the worst case where they find more), and the FPR check
   (:func:`evaluation.analysis.fpr_check`);
3. reports per threat model the per-sample worst case over the whole-batch attacks, each mixed-batch
   attack's AE-part accuracy and the headline (the lowest), every accuracy with its 95% interval, DAD
   against the undefended classifier with a paired interval, and detection metrics per batch size
   (:mod:`evaluation.analysis`);
4. writes ``report.json``, ``report.md`` (:mod:`evaluation.report`) and PNG plots (``plots/``), also logged
   to TensorBoard (``logs/eval``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from callbacks import DetectionHistogramLogger
from dad.attacks import AttackSpec
from dad.io import atomic_torch_save, atomic_write_json, atomic_write_text
from datamodules import DADDataModule
from evaluation.analysis import fpr_check, fraction, pop_samples, worst_cases
from evaluation.attacking import TRANSFER_PREFIX, mixed_name, run_attacks, transfer_defenses, transfer_source
from evaluation.context import Context, open_context
from evaluation.report import report_markdown, strict_json
from evaluation.sanity import check_more_draws, run_sanity
from evaluation.state import AttackState
from evaluation.summaries import (
    accuracies, attack_cost, detection_summary, mixed_entry, purifier_summary, stage_timings, write_plots,
)
from lightning_modules.evaluator import CLEAN
from pipeline.config import PipelineConfig

__all__ = ["evaluate", "mixed_name"]


@dataclass
class _Suite:
    """The attacks of one evaluation: every spec at the defense's batch size, their threats, the transfer sources,
    the mixed-batch attacks, and the images each set is run on."""

    specs: dict[str, AttackSpec]
    threats: dict[str, str]
    sources: dict[str, tuple[nn.Module, str]]
    mixed_bases: dict[str, tuple[str, float]]
    transfer: dict[str, Any] | None
    n: int
    n_defense: int

    @property
    def mixed(self) -> dict[str, tuple[AttackSpec, float]]:
        return {name: (self.specs[a], p) for name, (a, p) in self.mixed_bases.items()}

    def split(self) -> tuple[dict[str, AttackSpec], dict[str, AttackSpec]]:
        """The whole-batch attacks that do not go through a defense, and those that do (this one's, or another's
        for a transfer)."""
        through = {name: s for name, s in self.specs.items() if s.threat == "defense"}
        return {name: s for name, s in self.specs.items() if name not in through}, through

    def sources_of(self, attacks: Mapping[str, AttackSpec]) -> dict[str, tuple[nn.Module, str]]:
        """The transfer sources of ``attacks``."""
        return {name: source for name, source in self.sources.items() if name in attacks}


def _suite(ctx: Context, dm: DADDataModule) -> _Suite:
    ev = ctx.cfg.eval
    n = len(ctx.y)
    specs = {name: replace(spec, batch_size=ctx.batch_size) for name, spec in ev.attacks.items()}
    threats = {name: s.threat for name, s in specs.items()}
    sources: dict[str, tuple[nn.Module, str]] = {}
    transfer = None
    if ev.transfer.attacks:
        source, source_key = transfer_source(ctx, dm, ev.transfer)
        with torch.no_grad():
            source_acc = fraction(source.to(ctx.device)(ctx.x.to(ctx.device)).argmax(1) == ctx.y.to(ctx.device))
        for name in ev.transfer.attacks:
            specs[TRANSFER_PREFIX + name] = specs[name]
            threats[TRANSFER_PREFIX + name] = "transfer"
            sources[TRANSFER_PREFIX + name] = (source, source_key)
        transfer = {"source": {**asdict(ev.transfer), "model": ev.transfer.model or
                               ctx.defense.specs["classifier"]["name"], "clean_acc": source_acc},
                    "attacks": [TRANSFER_PREFIX + a for a in ev.transfer.attacks]}
    for source_name, source in transfer_defenses(ctx, ev.transfer).items():
        for name in ev.transfer.defense_attacks:
            key = f"{TRANSFER_PREFIX}{source_name}_{name}"
            specs[key], threats[key], sources[key] = specs[name], "transfer", source
    if ev.transfer.defenses:
        transfer = {**(transfer or {}), "defenses": dict(ev.transfer.defenses),
                    "defense_attacks": [f"{TRANSFER_PREFIX}{d}_{a}" for d in ev.transfer.defenses
                                        for a in ev.transfer.defense_attacks]}
    mixed_bases = {mixed_name(a, p): (a, p) for a in ev.mixed_attacks for p in ev.mixed_fractions}
    n_defense = n if ev.max_test_defense is None else min(ev.max_test_defense, n)
    return _Suite(specs, threats, sources, mixed_bases, transfer, n, n_defense)


def _sanity(ctx: Context, suite: _Suite, states: Mapping[str, AttackState], dad: Mapping[str, Tensor],
            num_classes: int, calibration_pool: int, target_fpr: float) -> tuple[dict[str, Any], ...]:
    """The sanity phase (:mod:`evaluation.sanity`) and the FPR check: ``(checks, sweep, folded, purified share,
    FPR detail)``."""
    ev, b, defense = ctx.cfg.eval, ctx.batch_size, ctx.defense

    def rerun(attacks: Mapping[str, AttackSpec], count: int, starts: Mapping[str, str]) -> dict[str, dict[str, Tensor]]:
        module = run_attacks(ctx, attacks, count, starts={name: states[start] for name, start in starts.items()})
        return {key: {name: module.states[name].gather(key) for name in attacks} for key in ("dad", "undefended")}

    probe_name = next(iter(suite.split()[1]), CLEAN)
    probes = (ctx.x[:b].to(ctx.device), states[probe_name].batches[0]["x_adv"].to(ctx.device),
              ctx.y[:b].to(ctx.device))
    checks, sweep, folded = run_sanity(defense, probes, suite.specs, suite.threats, dad, num_classes, rerun,
                                       ev.sanity_attack, ev.sanity_samples, b, ev.sweep_factors, ev.sanity_z)
    if sweep:  # the strongest attack's AEs on the re-run subset, judged with twice the draws
        checks["more_draws"] = check_more_draws(defense, sweep["attack"], suite.specs[sweep["attack"]],
                                                states[sweep["attack"]].batches, ctx.fpr_labels, sweep["n"],
                                                ev.draws, ev.sanity_z)
    pool = ctx.fpr_pool.to(ctx.device)
    purified = defense.purified_share(pool, b, ev.random_batches, torch.Generator().manual_seed(7))
    fpr_detail = None  # a fixed route (never / always) has no false positives to check
    if defense.router.detecting:
        checks["fpr"], fpr_detail = fpr_check(purified, target_fpr, len(ctx.fpr_labels), calibration_pool, b,
                                              defense.router, ev.sanity_z)
    return checks, sweep, folded, purified, fpr_detail


def evaluate(cfg: PipelineConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``runs/<name>/defense.pt`` under ``cfg.eval`` and write ``report.json`` / ``report.md`` / plots."""
    start = time.perf_counter()
    ctx, dm = open_context(cfg, run_dir)
    suite = _suite(ctx, dm)
    whole, through = suite.split()
    first = run_attacks(ctx, whole, suite.n, sources=suite.sources_of(whole), with_clean=True,
                        callbacks=[DetectionHistogramLogger()])
    second = run_attacks(ctx, through, suite.n_defense, sources=suite.sources_of(through), mixed=suite.mixed)
    attacks_seconds = time.perf_counter() - start
    states = {**first.states, **second.states}
    results = {**first.results(), **second.results()}
    names = [*suite.specs, *suite.mixed_bases]
    dad = {name: states[name].gather("dad") for name in names}
    undefended = {name: states[name].gather("undefended") for name in suite.specs}
    with torch.no_grad():
        num_classes = int(ctx.defense.classifier(ctx.x[:2].to(ctx.device)).shape[1])
    detection, clean_scores, attack_scores = detection_summary(ctx, states, suite.threats, results)
    sanity_start = time.perf_counter()
    calibration_pool = len(getattr(dm.splits, dm.splits.calibration_split))
    checks, sweep, folded, purified, fpr_detail = _sanity(ctx, suite, states, dad, num_classes, calibration_pool,
                                                          detection["target_fpr"])
    report: dict[str, Any] = {
        "clean_acc": {**accuracies(states, results, CLEAN), "detection_rate": results[CLEAN]["detection_rate"]},
        "robust_acc": {name: accuracies(states, results, name) for name in suite.specs},
        "mixed": {name: mixed_entry(states[name], results[name], attack, p, suite.specs[attack].threat)
                  for name, (attack, p) in suite.mixed_bases.items()},
        "worst_case": worst_cases(suite.specs, suite.threats, dad, undefended, suite.mixed_bases, folded),
        "detection": {**detection, "clean_purified": purified, "fpr_check": fpr_detail},
        "transfer": suite.transfer,
        "sanity": {key: c.as_dict() for key, c in checks.items()},
        "sweep": sweep,
        "attacks": {name: {**s.as_dict(), "threat": suite.threats[name]} for name, s in suite.specs.items()},
        "routing": ctx.defense.routing, "defense_file": ctx.defense_file, "purifier": purifier_summary(ctx.defense),
        "route_selection": ctx.defense.route_selection, "flagged_classifier": ctx.defense.specs["flagged_classifier"],
        "draws": cfg.eval.draws, "num_test": suite.n, "num_test_defense": suite.n_defense, "num_classes": num_classes,
        "variant": ctx.variant,
    }
    if cfg.eval.plots and pl.utilities.rank_zero.rank_zero_only.rank == 0:
        report["plots"] = write_plots(ctx, states, report, clean_scores, attack_scores, num_classes)
    report["timings_s"] = {**stage_timings(ctx.paths), "eval": time.perf_counter() - start,
                           "eval_attacks": attacks_seconds, "eval_sanity": time.perf_counter() - sanity_start,
                           "attacks": {name: states[name].per_batch("seconds").sum().item() for name in names}}
    report["attack_cost"] = attack_cost({**suite.specs, **{name: spec for name, (spec, _) in suite.mixed.items()}},
                                        states)
    return _write(ctx, states, report)


def _write(ctx: Context, states: Mapping[str, AttackState], report: dict[str, Any]) -> dict[str, Any]:
    """``report.{json,md}`` and the per-sample worst cases (``report_samples.pt``, for paired intervals) on rank 0."""
    report["worst_case"], samples = pop_samples(report["worst_case"])
    samples["clean_acc/samples"] = states[CLEAN].gather("dad").bool().cpu()
    report = strict_json(report)
    name = ctx.output("report").name
    if pl.utilities.rank_zero.rank_zero_only.rank == 0:
        atomic_torch_save(samples, ctx.paths.root / f"{name}_samples.pt")
        atomic_write_json(report, ctx.paths.root / f"{name}.json")
        atomic_write_text(report_markdown(report), ctx.paths.root / f"{name}.md")
    return report
