"""Diffusion purification (fixed t*, SSNI-N, SSNI-L) beside DAD and the classifier alone, in one harness.

    OMP_NUM_THREADS=2 python train.py pipeline --config configs/digits_ssni.yaml
    OMP_NUM_THREADS=2 python -m bench.purification --run runs/digits_ssni
    python -m bench.purification --run runs/digits_ssni --trainer.accelerator gpu --trainer.devices 1

Each row is an evaluation (``evaluation.runner.evaluate``, as ``eval.py`` runs it: R-draw rule, attacks judged on
whole batches of the deployed defense, sanity re-runs folded in) of one defense file of the run under one routing,
with the attacks of the run's ``eval`` section that apply to it:

| row | defense file | routing | attacks beyond the common ones |
| --- | --- | --- | --- |
| classifier alone | ``defense.pt`` | ``never`` | |
| fixed-t | ``defense_fixed.pt`` | ``always`` | |
| SSNI-N / SSNI-L | ``defense_ssni_n.pt`` / ``defense_ssni_l.pt`` | ``always`` | ``evade_eps`` |
| DAD | ``defense.pt`` | the run's | detector evasion (``evade_*``) |
| DAD + diffusion purifier | ``defense_fixed.pt`` | the run's detecting routing | detector evasion |

The common attacks are ``pgd_linf`` (classifier only) and the full-white-box ``adaptive_pgd_eot``,
``autoattack_rand`` and ``square_eot`` (whichever of them the run's configuration has). Columns: clean accuracy
(right in every draw; the mean over draws beside it), classifier-only PGD and the full-white-box worst case (the
per-sample worst over every whole-batch attack and the sanity re-runs), each with its 95% Wilson interval, and the
seconds per 100 clean test images of one pass of the defense at its inference batch size (this process's
threads). Paired 95% intervals (Newcombe) of SSNI minus fixed-t on the same images answer the SSNI claim. Rows
already evaluated are reused from the run's ``eval_state*`` (an interrupted comparison resumes). Any other
``--<section>.<option> VALUE`` overrides the run's saved ``config.yaml``, as with ``train.py``: the trainer flags
(``--trainer.accelerator gpu`` ...) choose the device of the evaluations and of the timing. Adds the run's entry
(``--key``) to ``bench/results/purification.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


from bench.machine import RESULTS, machine_description, parse_with_overrides, start_run_bench, synchronize
from dad.defense import DADDefense
from dad.defense_file import load_defense
from dad.io import atomic_write_json
from dad.routing import DETECTING
from dad.stats import accuracy_interval, paired_difference_interval
from evaluation.runner import evaluate
from pipeline.config import PipelineConfig
from pipeline.stages import load_datamodule
from pipeline.paths import RunPaths

log = logging.getLogger("bench.purification")

COMMON = ("pgd_linf", "adaptive_pgd_eot", "autoattack_rand", "square_eot")
DETECTOR_EVASION = ("evade_clean", "evade_denoised", "evade_bpda")
CLASSIFIER_PGD = "pgd_linf"


@dataclass(frozen=True)
class Row:
    """One row of the comparison: a defense file of the run, its routing (None: as saved) and extra attacks."""

    label: str
    defense: str
    routing: str | None
    extra: tuple[str, ...] = ()


def rows(detecting: str) -> dict[str, Row]:
    """The rows, DAD's under the run's detecting routing ``detecting``."""
    return {
        "classifier": Row("classifier alone", "defense.pt", "never"),
        "fixed": Row("fixed-t purification", "defense_fixed.pt", None),
        "ssni_n": Row("SSNI-N", "defense_ssni_n.pt", None, ("evade_eps",)),
        "ssni_l": Row("SSNI-L", "defense_ssni_l.pt", None, ("evade_eps",)),
        "dad": Row("DAD", "defense.pt", None, DETECTOR_EVASION),
        "dad_fixed": Row("DAD + diffusion purifier (fixed t*)", "defense_fixed.pt", detecting, DETECTOR_EVASION),
    }


def row_config(cfg: PipelineConfig, row: Row) -> PipelineConfig:
    """The run's configuration with the row's defense file, routing and attacks (no mixed batches, no transfer)."""
    wanted = (*COMMON, *row.extra)
    attacks = {name: spec for name, spec in cfg.eval.attacks.items() if name in wanted}
    missing = sorted(set(wanted) - set(attacks))
    if missing:
        log.warning("%s: the run's eval section has no %s", row.label, ", ".join(missing))
    evaluation = replace(cfg.eval, attacks=attacks, defense=None if row.defense == "defense.pt" else row.defense,
                         routing=row.routing, mixed_attacks=[], transfer=replace(cfg.eval.transfer, attacks=[]),
                         sanity_attack=None)
    return replace(cfg, eval=evaluation)


@torch.no_grad()
def seconds_per_100(defense: DADDefense, images: Tensor, batch_size: int, repeats: int = 3) -> float:
    """Seconds one pass of ``defense`` takes per 100 images, in batches of ``batch_size`` (best of ``repeats``), on
    the device of ``images``."""
    batches = list(images.split(batch_size))
    defense.forward_draws(batches[0], 1)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(images.device)
        start = time.perf_counter()
        for batch in batches:
            defense.forward_draws(batch, 1)
        synchronize(images.device)
        best = min(best, time.perf_counter() - start)
    return 100.0 * best / len(images)


def worst_case_samples(samples: dict[str, Tensor], label: str) -> Tensor:
    """Per-sample worst case of a threat model: every whole-batch attack, and the sanity re-runs on their prefix."""
    correct = samples[f"{label}/all_attacks/samples"].clone()
    folded = samples.get(f"{label}/folded/samples")
    if folded is not None:
        correct[: len(folded)] &= folded
    return correct


def _entry(correct: Tensor) -> dict[str, Any]:
    return {"acc": correct.double().mean().item(), "ci95": list(accuracy_interval(correct)), "n": correct.numel()}


def evaluate_row(cfg: PipelineConfig, paths: RunPaths, row: Row, timing_images: Tensor) -> dict[str, Any]:
    """Evaluate one row and collect its columns (and the per-sample vectors the paired intervals need); the row's
    defense is timed on the device of ``timing_images``."""
    row_cfg = row_config(cfg, row)
    start = time.perf_counter()
    report = evaluate(row_cfg)
    name = "report" + (f"_{report['variant']}" if report["variant"] else "")
    samples = torch.load(paths.root / f"{name}_samples.pt", weights_only=True)
    label = next(iter(report["worst_case"]))
    defense = load_defense(paths.root / row.defense).to(timing_images.device)
    if row.routing is not None:
        defense.routing = row.routing
    worst = worst_case_samples(samples, label)
    pgd = report["robust_acc"].get(CLASSIFIER_PGD)
    return {
        "label": row.label, "defense_file": row.defense, "routing": report["routing"], "report": f"{name}.json",
        "purifier": report["purifier"], "threat_model": label,
        "clean": _entry(samples["clean_acc/samples"]), "clean_mean_over_draws": report["clean_acc"]["dad_mean"],
        "classifier_pgd": None if pgd is None else {"acc": pgd["dad"], "ci95": pgd["dad_ci95"], "n": pgd["n"]},
        "white_box_worst": {**_entry(worst), "attacks": report["worst_case"][label]["all_attacks"]["attacks"],
                            "folded_extra_errors": (report["worst_case"][label].get("folded") or {}).get(
                                "extra_errors", 0)},
        "sanity": {key: check["passed"] for key, check in report["sanity"].items()},
        "sanity_detail": {key: check["detail"] for key, check in report["sanity"].items() if not check["passed"]},
        "seconds_per_100": seconds_per_100(defense, timing_images, cfg.defense.batch_size),
        "eval_seconds": time.perf_counter() - start,
        "_clean": samples["clean_acc/samples"], "_worst": worst,
    }


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[float]]:
    """Paired 95% intervals of ``a - b`` (clean accuracy and worst case) on the same test images."""
    out = {}
    for key in ("clean", "worst"):
        x, y = a[f"_{key}"], b[f"_{key}"]
        n = min(len(x), len(y))
        out[key] = list(paired_difference_interval(x[:n], y[:n]))
    return out


def _ci(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    return f"{entry['acc']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"


def table_markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table, and the paired intervals of SSNI minus fixed-t."""
    lines = ["| defense | clean, all draws [95% CI] | clean, mean over draws | classifier-only PGD [95% CI] | "
             "full-white-box worst case [95% CI] | seconds / 100 images | sanity checks |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"].values():
        failed = [k for k, ok in r["sanity"].items() if not ok]
        lines.append(f"| {r['label']} | {_ci(r['clean'])} | {r['clean_mean_over_draws']:.3f} | "
                     f"{_ci(r['classifier_pgd'])} | {_ci(r['white_box_worst'])} "
                     f"| {r['seconds_per_100']:.3f} | {'all pass' if not failed else 'failed: ' + ', '.join(failed)} |")
    for key, c in result["paired"].items():
        lines.append("")
        lines.append(f"{key.replace('_minus_', ' minus ')} (paired, same images): clean {c['clean'][0]:+.3f} "
                     f"[{c['clean'][1]:+.3f}, {c['clean'][2]:+.3f}], worst case {c['worst'][0]:+.3f} "
                     f"[{c['worst'][1]:+.3f}, {c['worst'][2]:+.3f}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run trained with a *_ssni.yaml configuration")
    parser.add_argument("--rows", default=",".join(rows("batch")), help="comma-separated rows to evaluate")
    parser.add_argument("--key", default=None, help="this run's key in the results file (default: the run's name)")
    parser.add_argument("--out", type=Path, default=RESULTS / "purification.json")
    parser.add_argument("--threads", type=int, default=None)
    args, overrides = parse_with_overrides(parser, argv)
    threads, cfg, paths, device = start_run_bench(args.run, args.threads, overrides)
    table = rows(cfg.defense.routing if cfg.defense.routing in DETECTING else "batch")
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; expected some of {sorted(table)}")
    test_images, _ = load_datamodule(cfg, paths).split_tensors("test")
    timing_images = test_images[: 4 * cfg.defense.batch_size].to(device)
    results = {key: evaluate_row(cfg, paths, table[key], timing_images) for key in chosen}
    comparisons = {f"{k}_minus_fixed": paired(results[k], results["fixed"])
                   for k in ("ssni_n", "ssni_l") if k in results and "fixed" in results}
    result = {
        "machine": machine_description(device),
        "settings": {"run": str(args.run), "threads": threads, "draws": cfg.eval.draws,
                     "defense_batch_size": cfg.defense.batch_size},
        "selection": json.loads(paths.done("purifier").read_text()) if paths.done("purifier").is_file() else None,
        "score_stage": json.loads(paths.done("score").read_text()) if paths.done("score").is_file() else None,
        "rows": {k: {key: v for key, v in r.items() if not key.startswith("_")} for k, r in results.items()},
        "paired": comparisons,
    }
    everything = json.loads(args.out.read_text()) if args.out.is_file() else {}
    everything[args.key or args.run.name] = result
    atomic_write_json(everything, args.out)
    print(table_markdown(result))
    return result


if __name__ == "__main__":
    main()
