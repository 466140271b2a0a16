"""A robust-training leaderboard's rows from a run's two reports (made unless saved): the backbone alone
(``report_never.json``) and with DAD (``report.json``), each with its clean accuracy, AutoAttack, worst case and
costs, and DAD's worst case minus the backbone's with its paired 95% interval (Newcombe) on the images both
cover."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.machine import stage_seconds, stage_summary
from dad.stats import paired_difference_interval
from evaluation.runner import evaluate
from pipeline.config import PipelineConfig
from pipeline.paths import STAGES

__all__ = ["leaderboard_rows", "evaluate_unless_saved", "Rows"]


def _threat(report: dict[str, Any], requested: str | None) -> str:
    """The threat model of the table: ``requested``, else the report's first Linf one."""
    labels = list(report["worst_case"])
    if requested is not None:
        if requested not in labels:
            raise ValueError(f"No threat model {requested!r} in the report; it has {labels}")
        return requested
    return next((label for label in labels if label.startswith("linf")), labels[0])


def _samples(run: Path, report_name: str, threat: str) -> torch.Tensor:
    samples = torch.load(run / f"{report_name}_samples.pt", weights_only=True)
    return samples[f"{threat}/headline/samples"]


def _row(method: str, setting: str, report: dict[str, Any], threat: str, autoattack: str,
         seconds: float, passes: float | None) -> dict[str, Any]:
    clean, worst = report["clean_acc"], report["worst_case"][threat]["headline"]
    aa = report["robust_acc"].get(autoattack)
    chosen = report.get("route_selection") if setting != "alone" else None
    return {
        "method": method, "setting": setting,
        "clean_acc": clean["dad"], "clean_ci95": clean["dad_ci95"],
        "autoattack": aa["dad"] if aa else None, "autoattack_ci95": aa["dad_ci95"] if aa else None,
        "worst_case": worst["dad"], "worst_case_ci95": worst["ci95"], "worst_case_n": worst["n"],
        "worst_case_source": worst["source"],
        "clean_fpr": report["detection"]["clean_purified"] if setting != "alone" else None,
        "training_seconds": seconds, "backward_passes_per_sample": passes,
        "route": chosen["chosen"] if chosen else None,  # the defense stage's choice, with its validation numbers
        "route_validation": {name: {key: r[key] for key in ("worst_case", "interval", "classifier_only", "tied")}
                             for name, r in chosen["routes"].items()} if chosen else None,
    }


Rows = list[dict[str, Any]]


def leaderboard_rows(run: Path, method: str, threat: str | None, autoattack: str, alone_run: Path | None = None,
                     setting: str = "with DAD") -> tuple[Rows, dict[str, Any]]:
    """The two rows of one method (alone, with DAD: ``setting``) and DAD's worst case minus the backbone's: the
    defense's evaluation in ``run``, the backbone's (``report_never``) in ``alone_run`` (default: ``run``), on the
    same classifier and test images."""
    alone_run = alone_run or run
    with_dad = json.loads((run / "report.json").read_text())
    alone = json.loads((alone_run / "report_never.json").read_text())
    threat = _threat(with_dad, threat)
    passes = stage_summary(run, "classifier").get("backward_passes_per_sample")
    every_stage = sum(stage_seconds(run, s) for s in STAGES)
    rows = [_row(method, "alone", alone, threat, autoattack, stage_seconds(alone_run, "classifier"), passes),
            _row(method, setting, with_dad, threat, autoattack, every_stage, passes)]
    dad, backbone = _samples(run, "report", threat), _samples(alone_run, "report_never", threat)
    n = min(len(dad), len(backbone))  # a folded headline covers the first sanity images only
    difference, low, high = paired_difference_interval(dad[:n], backbone[:n])
    return rows, {"method": method, "threat": threat, "n": n, "dad_minus_alone": difference, "ci95": [low, high]}


def evaluate_unless_saved(cfg: PipelineConfig, routing: str | None = None) -> None:
    """The run's evaluation, unless its report is saved; ``routing`` ``never``: the backbone alone (mixed batches
    left out: a classifier in eval mode classifies each image independently of its batch)."""
    report = cfg.run.dir / ("report.json" if routing is None else f"report_{routing}.json")
    if not report.is_file():
        evaluate(cfg if routing is None else replace(cfg, eval=replace(cfg.eval, routing=routing, mixed_attacks=[])))
