"""Can an attacker walk around the detector? One comparison of evaluated runs on one dataset's test images.

Each row is an evaluated run's report (``<run>/report[_<variant>].json``, :mod:`evaluation.runner`): the standard
classifier alone (``--eval.routing never``), the robust backbone alone (a two-classifier defense under ``--eval.routing
always`` with no purifier: the second classifier alone), DAD with the standard kernel, with the evasion-aware kernel
(``kernel.adversarial``, frozen and trained phi) and two-classifier DAD (``defense.flagged_classifier``) with each
kernel. Per row: clean accuracy, the worst case under the full white box (the report's headline at the threat model,
sanity checks folded in), evasion success, the clean images' purified share (the clean FPR), training seconds, and
the paired difference of the worst case against the ``--compare`` rows on their common test images.

Evasion success is the share of the evasion attacks' AEs (those that fool the clean route while staying unflagged:
``objective: evade_clean``, orthogonal PGD among them) left unflagged and misclassified in any of the evaluation's
noise draws, judged by the batch test alone (``batch``: routing ``batch``, each attack batch as one detector batch)
and by the per-sample test alone (``sample``), the strongest attack's share for each. ``--transfer-from RUN:REPORT``
also judges that run's evasion AEs (crafted against another kernel on the same test images) on every row.

    python -m bench.detector_robustness --dataset digits \\
        --row "standard alone=runs/demo:report_never" --row "DAD=runs/demo:report" ... --compare "standard alone"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.machine import (RESULTS, configure_threads, load_run, machine_description, median_ms, pct, stage_seconds,
                           write_result)
from dad.attacks.registry import chunk_seed, seeded
from dad.defense import DADDefense
from dad.defense_file import load_defense
from dad.stats import paired_difference_interval
from evaluation.state import AttackState
from pipeline.paths import STAGES
from pipeline.stages import load_datamodule

__all__ = ["main", "evasion_success", "markdown", "row_summary"]

NAME = "detector_robustness"


def _source(text: str) -> tuple[Path, str]:
    """``RUN:REPORT`` (REPORT: ``report``, ``report_never``, ...) as a run directory and a report name."""
    run, _, report = text.rpartition(":")
    if not run or not report.startswith("report"):
        raise ValueError(f"Expected RUN:REPORT (e.g. runs/demo:report_never), got {text!r}")
    return Path(run), report


def _evasion_states(run: Path, report: dict[str, Any], report_name: str, threat: str) -> dict[str, AttackState]:
    """The saved per-batch AEs of the report's evasion attacks at the ``threat`` model (through the defense,
    ``objective: evade_clean``; the mixed batches' are left out)."""
    state_dir = run / report_name.replace("report", "eval_state", 1)
    model = report["worst_case"][threat]
    states = {}
    for name, spec in report["attacks"].items():
        evasion = spec["threat"] == "defense" and spec.get("objective") == "evade_clean"
        if evasion and not name.startswith("mixed") and (spec["norm"], spec["eps"]) == (model["norm"], model["eps"]):
            payload = torch.load(state_dir / f"{name}.pt", map_location="cpu", weights_only=True)
            states[name] = AttackState(payload["key"], {int(b): r for b, r in payload["batches"].items()})
    return states


@torch.no_grad()
def evasion_success(defense: DADDefense, states: dict[str, AttackState], labels: Tensor, draws: int,
                    seeds: dict[str, int]) -> dict[str, Any]:
    """Per routing (``batch``, ``sample``), the share of each attack's AEs unflagged and wrong in any of ``draws``
    noise draws (judged with the evaluation's seeds: stream 1 of the attack's seed per batch), and the largest."""
    result: dict[str, Any] = {}
    routing = defense.routing
    for mode in ("batch", "sample"):
        defense.routing = mode
        shares = {}
        for name, state in states.items():
            evaded = []
            for i in sorted(state.batches):
                record = state.batches[i]
                x_adv, y = record["x_adv"], labels[record["index"]]
                with seeded(chunk_seed(seeds.get(name, 0), i, stream=1), x_adv):
                    out = defense.forward_draws(x_adv, draws)
                evaded.append(~out.flags & (out.logits.argmax(2) != y).any(0))
            shares[name] = float(torch.cat(evaded).float().mean())
        result[mode] = max(shares.values()) if shares else None
        result[f"{mode}_per_attack"] = shares
    defense.routing = routing
    return result


def _training_seconds(run: Path, report: dict[str, Any], flagged: str | None) -> float:
    """What the row's defense cost to train: the classifier stage alone for a classifier alone (``never``: this
    run's; ``always`` with no purifier: the flagged classifier's), else every stage plus the flagged classifier's."""
    second = stage_seconds(Path(flagged).parents[1], "classifier") if flagged else 0.0  # RUN/classifier/best.ckpt
    if report["routing"] == "never":
        return stage_seconds(run, "classifier")
    if report["routing"] == "always" and (report.get("purifier") or {}).get("kind") == "identity" and flagged:
        return second
    return sum(stage_seconds(run, stage) for stage in STAGES) + second


def _clean_ms_per_image(defense: DADDefense, images: Tensor, batch_size: int) -> float:
    """Milliseconds per clean test image through the defense (one draw, in its batches; median of 3 passes): what
    a kernel with its own phi adds at inference."""
    batches = [b for b in images.split(batch_size) if len(b) >= defense.router.min_batch]
    count = sum(len(b) for b in batches)
    with torch.no_grad():
        return median_ms(lambda: [defense.forward_draws(b, 1, validate=False) for b in batches], 3) / count


def row_summary(name: str, run: Path, report_name: str, threat: str,
                transfer: dict[str, AttackState] | None) -> tuple[dict[str, Any], Tensor]:
    """One row, and its per-sample headline (for the paired differences)."""
    report = json.loads((run / f"{report_name}.json").read_text())
    cfg, paths = load_run(run)
    headline = report["worst_case"][threat]["headline"]
    samples = torch.load(run / f"{report_name}_samples.pt", weights_only=True)[f"{threat}/headline/samples"]
    detecting = report["routing"] not in ("never", "always")
    row: dict[str, Any] = {
        "name": name, "run": str(run), "report": report_name, "routing": report["routing"],
        "clean_acc": report["clean_acc"]["dad"], "clean_ci95": report["clean_acc"]["dad_ci95"],
        "worst_case": headline["dad"], "worst_case_ci95": headline["ci95"], "worst_case_n": headline["n"],
        "worst_case_source": headline["source"],
        "clean_fpr": report["detection"]["clean_purified"] if detecting else None,
        "training_seconds": _training_seconds(run, report, cfg.defense.flagged_classifier),
        "flagged_classifier": cfg.defense.flagged_classifier, "evasion_success": None,
    }
    defense = load_defense(paths.defense)
    defense.routing = report["routing"]
    images, labels = load_datamodule(cfg, paths).split_tensors("test")
    row["clean_ms_per_image"] = _clean_ms_per_image(defense, images, cfg.defense.batch_size)
    if detecting:
        seeds = {k: int(v.get("seed", 0)) for k, v in report["attacks"].items()}
        row["evasion_success"] = evasion_success(defense, _evasion_states(run, report, report_name, threat), labels,
                                                 report["draws"], seeds)
        if transfer is not None:
            row["evasion_success_transferred"] = evasion_success(defense, transfer, labels, report["draws"], seeds)
    return row, samples


def _paired(rows: list[dict[str, Any]], samples: list[Tensor], compare: list[str]) -> None:
    """Each row's worst case minus each ``compare`` row's, paired on their common (first) test images."""
    named = {row["name"]: s for row, s in zip(rows, samples)}
    for row, mine in zip(rows, samples):
        row["vs"] = {}
        for other in compare:
            theirs = named[other]
            n = min(len(mine), len(theirs))
            d, lo, hi = paired_difference_interval(mine[:n], theirs[:n])
            row["vs"][other] = {"difference": d, "ci95": [lo, hi], "n": n}


def markdown(result: dict[str, Any]) -> str:
    """The rows of every dataset as Markdown tables (accuracies in %, evasion success as shares)."""
    lines = []
    for dataset, rows in result.items():
        if dataset == "runs" or not rows:
            continue
        compare = list(rows[0]["vs"])
        lines += [f"## {dataset} ({result['runs'][dataset]['threat']})", "",
                  "| row | clean | worst case | evasion success: batch / sample | clean FPR | training s | ms / image "
                  "| " + " | ".join(f"minus {name}" for name in compare) + " |",
                  "| --- " * (7 + len(compare)) + "|"]
        for row in rows:
            evasion, (low, high) = row["evasion_success"], row["worst_case_ci95"]
            cells = [row["name"], pct(row["clean_acc"]),
                     f"{pct(row['worst_case'])} [{pct(low)}, {pct(high)}] (n={row['worst_case_n']})",
                     "-" if evasion is None else f"{evasion['batch']:.3f} / {evasion['sample']:.3f}",
                     pct(row["clean_fpr"]), f"{row['training_seconds']:.0f}", f"{row['clean_ms_per_image']:.3f}",
                     *(f"{100 * v['difference']:+.1f} [{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}]"
                       for v in row["vs"].values())]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="the key of the result (digits, cifar10_cpu)")
    parser.add_argument("--row", action="append", required=True, metavar="NAME=RUN:REPORT",
                        help="a row: its name, an evaluated run and the report's name (report, report_never, ...)")
    parser.add_argument("--compare", nargs="+", default=None, help="rows every row is paired against (default: "
                        "the first two)")
    parser.add_argument("--threat", default="linf eps=0.2", help="the threat model (a key of the reports' worst_case)")
    parser.add_argument("--transfer-from", default=None, metavar="RUN:REPORT",
                        help="also judge this run's evasion AEs on every detecting row")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    threads = configure_threads(args.threads)
    specs = [(text.partition("=")[0], *_source(text.partition("=")[2])) for text in args.row]
    transfer = None
    if args.transfer_from:
        run, report_name = _source(args.transfer_from)
        report = json.loads((run / f"{report_name}.json").read_text())
        transfer = _evasion_states(run, report, report_name, args.threat)
    rows, samples = [], []
    for name, run, report_name in specs:
        row, headline = row_summary(name, run, report_name, args.threat, transfer)
        rows.append(row)
        samples.append(headline)
        print(f"{name}: clean {row['clean_acc']:.3f}, worst {row['worst_case']:.3f}, evasion "
              f"{row['evasion_success'] and {k: row['evasion_success'][k] for k in ('batch', 'sample')}}", flush=True)
    _paired(rows, samples, args.compare or [specs[0][0], specs[1][0]])
    path = RESULTS / f"{NAME}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result[args.dataset] = rows
    result.setdefault("runs", {})[args.dataset] = {
        "threat": args.threat, "transfer_from": args.transfer_from, "machine": machine_description(torch.device("cpu")),
        "threads": threads, "command": " ".join(["python -m bench.detector_robustness", *(argv or sys.argv[1:])])}
    write_result(NAME, result, RESULTS)
    (RESULTS / f"{NAME}.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
