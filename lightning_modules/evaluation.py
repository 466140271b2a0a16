"""Evaluate a saved defense: clean and robust accuracy per attack, detection rates, the report files."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks import DetectionHistogramLogger
from dad.defense import DADDefense, load_defense
from dad.io import atomic_write_json, atomic_write_text
from lightning_modules.config import PipelineConfig
from lightning_modules.dad import CLEAN, DADModule
from lightning_modules.pipeline import STAGES, RunPaths, _datamodule

__all__ = ["evaluate", "report_markdown"]

log = logging.getLogger(__name__)


def _random_batch_rate(defense: DADDefense, pool: torch.Tensor, batch_size: int, num: int, seed: int) -> float:
    """Fraction of ``num`` random batches of ``pool`` that the detector flags."""
    detector = defense.detector
    scores = detector.batch_scorer(pool)(batch_size, num, torch.Generator().manual_seed(seed))
    return (scores > detector.threshold_for(batch_size)).float().mean().item()


def evaluate(cfg: PipelineConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``runs/<name>/defense.pt`` under ``cfg.eval`` and write ``report.json`` / ``report.md``."""
    paths = RunPaths(Path(run_dir) if run_dir is not None else cfg.run.dir)
    defense = load_defense(paths.defense)
    dm = _datamodule(cfg, paths)
    x, y = dm.split_tensors("test")
    if cfg.eval.max_test is not None:
        x, y = x[: cfg.eval.max_test], y[: cfg.eval.max_test]
    attacks = cfg.eval.attack_configs()
    batch_size = cfg.defense.batch_size
    for name, attack in attacks.items():
        attack.batch_size = batch_size
    module = DADModule(defense, attacks)
    logger = TensorBoardLogger(save_dir=str(paths.root), name="logs", version="eval", default_hp_metric=False)
    trainer = pl.Trainer(
        default_root_dir=str(paths.root), logger=logger, callbacks=[DetectionHistogramLogger()],
        inference_mode=False, **{k: v for k, v in cfg.trainer.kwargs().items() if not k.startswith("limit_")},
    )
    start = time.perf_counter()
    trainer.test(module, dataloaders=DataLoader(TensorDataset(x, y), batch_size=batch_size), verbose=False)
    eval_seconds = time.perf_counter() - start
    results = module.results()

    n_random = cfg.eval.random_batches
    detector = defense.detector
    clean_pool = torch.cat(module.kept[CLEAN])
    tpr: dict[str, float] = {}
    tpr_random: dict[str, float] = {}
    for name, attack in attacks.items():
        tpr[name] = results[name]["detection_rate"]
        if attack.threat == "classifier":  # AEs do not depend on the batch: random batches are valid draws
            tpr_random[name] = _random_batch_rate(defense, torch.cat(module.kept[name]), batch_size, n_random, 1)
    report: dict[str, Any] = {
        "clean_acc": {"undefended": results[CLEAN]["undefended"], "dad": results[CLEAN]["dad"],
                      "denoised": results[CLEAN]["denoised"]},
        "robust_acc": {name: {"undefended": results[name]["undefended"], "dad": results[name]["dad"]}
                       for name in attacks},
        "detection": {
            "threshold": detector.threshold_for(batch_size).item(),
            "target_fpr": detector.target_fpr,
            "batch_size": batch_size,
            "fpr_clean": _random_batch_rate(defense, clean_pool, batch_size, n_random, 0),
            "fpr_clean_sequential": results[CLEAN]["detection_rate"],
            "random_batches": n_random,
            "tpr": tpr,
            "tpr_random_batches": tpr_random,
        },
        "attacks": {name: attack.as_dict() for name, attack in attacks.items()},
        "num_test": len(y),
        "timings_s": {**_stage_timings(paths), "eval": eval_seconds},
    }
    if trainer.is_global_zero:
        atomic_write_json(report, paths.root / "report.json")
        atomic_write_text(report_markdown(report), paths.root / "report.md")
    return report


def _stage_timings(paths: RunPaths) -> dict[str, float]:
    timings = {}
    for stage in STAGES:
        done = paths.done(stage)
        if done.is_file():
            timings[stage] = json.loads(done.read_text()).get("seconds")
    return timings


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (what ``make demo`` prints)."""
    det = report["detection"]
    lines = [
        "| setting | undefended | DAD | detection rate |",
        "| --- | --- | --- | --- |",
        f"| clean | {report['clean_acc']['undefended']:.4f} | {report['clean_acc']['dad']:.4f} | "
        f"FPR {det['fpr_clean']:.4f} (target {det['target_fpr']:.2f}) |",
    ]
    for name, acc in report["robust_acc"].items():
        a = report["attacks"][name]
        label = f"{name} ({a['norm']} eps={a['eps']:.4g}, {a['steps']} steps, EOT {a['eot_samples']}, threat: {a['threat']})"
        lines.append(f"| {label} | {acc['undefended']:.4f} | {acc['dad']:.4f} | TPR {det['tpr'][name]:.4f} |")
    lines += [
        "",
        f"Denoised clean accuracy (the cost of a false positive): {report['clean_acc']['denoised']:.4f}. "
        f"Threshold {det['threshold']:.4g} at batch size {det['batch_size']}; FPR over {det['random_batches']} random "
        f"clean test batches. {report['num_test']} test images.",
        "",
        "Threat `classifier`: the attacker sees only the undefended classifier (the published setting). "
        "Threat `defense`: the attack differentiates through the whole defense (detector, noise with EOT, denoiser).",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items() if v is not None),
    ]
    return "\n".join(lines) + "\n"
