"""The attacks through the defense, the reference loop against the batched runs, side by side on the same batches.

    OMP_NUM_THREADS=2 python -m bench.attack_speed --run runs/demo
    python -m bench.attack_speed --run runs/demo --batches 4 --trainer.accelerator gpu --trainer.devices 1

Every attack through the defense of the run's ``eval.attacks``, and every mixed-batch attack through it, runs on the
first ``--batches`` batches of the test split exactly as the evaluation runs it (:class:`DefenseEvaluator`: the
same seeds, the evaluation's own noise draws for the accuracy), twice: under :func:`~dad.runs.looped_runs` (one call
per EOT sample and per draw, every budget spent: the program the evaluation ran before the runs were batched) and
with the batched runs (the evaluation's default; ``--max-images`` caps the images of one network pass,
``--stack-groups on|off`` stacks a mixed batch's groups or not, by default off the CPU only). Per attack:
the seconds of each and their ratio, DAD's accuracy under each (equal for fixed seeds up to the early stops, which
pick an earlier iterate of the same judged strength), and the defense passes and programs per batch. The machine
(CPU or GPU model, threads, load) is recorded with the numbers. Writes ``bench/results/attack_speed_<run>.json`` and
``.md`` (``--results``, ``--name``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from bench.machine import RESULTS, machine_description, parse_with_overrides, start_run_bench
from dad.defense_file import load_defense
from dad.io import atomic_write_json, atomic_write_text
from dad.runs import looped_runs, runs_settings
from evaluation.attacking import mixed_name
from lightning_modules.evaluator import DefenseEvaluator
from pipeline.stages import load_datamodule

log = logging.getLogger("bench.attack_speed")

MODES = ("looped", "batched")


def _settings(mode: str, max_images: int | None, stack_groups: bool | None) -> contextlib.AbstractContextManager[Any]:
    return looped_runs() if mode == "looped" else runs_settings(max_images=max_images, stack_groups=stack_groups)


def time_attacks(evaluator: DefenseEvaluator, names: list[str], x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 batches: int, max_images: int | None, stack_groups: bool | None = None) -> dict[str, dict[str, Any]]:
    """Per name and mode: seconds, DAD's accuracy, passes and programs over ``batches`` batches of ``batch_size``."""
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        rows[name] = {}
        for mode in MODES:
            totals = {"seconds": 0.0, "dad": 0.0, "n": 0, "passes": 0.0, "programs": 0.0, "stops": 0.0, "defense": 0.0}
            for k in range(batches):
                rows_k = slice(k * batch_size, (k + 1) * batch_size)
                index = torch.arange(rows_k.start, rows_k.stop, device=x.device)
                with _settings(mode, max_images, stack_groups):
                    record = evaluator.run_batch(name, x[rows_k], y[rows_k], index, k)
                for key in ("seconds", "passes", "programs", "stops"):
                    totals[key] += float(record[key])
                totals["dad"] += float(record["dad"].sum())
                totals["n"] += len(record["dad"])
                totals["defense"] += float(record["batches"])
            rows[name][mode] = {"seconds": totals["seconds"], "dad": totals["dad"] / totals["n"],
                                **{key: totals[key] / totals["defense"] for key in ("passes", "programs")},
                                "stopped_early": totals["stops"] / totals["defense"]}
            log.info("%s %s: %.1f s, DAD %.3f", name, mode, totals["seconds"], rows[name][mode]["dad"])
        rows[name]["speedup"] = rows[name]["looped"]["seconds"] / max(rows[name]["batched"]["seconds"], 1e-9)
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table, with the machine it was measured on."""
    m = result["machine"]
    where = m["gpu"] or f"{m['cpu_model']}, {m['torch_threads']} threads"
    lines = [f"Attacks through the defense on {result['batches']} batch(es) of {result['batch_size']} "
             f"({result['run']}), {where}, load {m['load_average_1min']:.2f} at the start:", "",
             "| attack | looped s | batched s | speed-up | DAD looped | DAD batched | passes/batch | "
             "programs/batch | stopped early |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in result["attacks"].items():
        lo, ba = row["looped"], row["batched"]
        lines.append(f"| {name} | {lo['seconds']:.1f} | {ba['seconds']:.1f} | {row['speedup']:.2f}x | "
                     f"{lo['dad']:.3f} | {ba['dad']:.3f} | {lo['passes']:.0f} -> {ba['passes']:.0f} | "
                     f"{lo['programs']:.0f} -> {ba['programs']:.0f} | {ba['stopped_early']:.2f} |")
    total = result["total_seconds"]
    lines.append(f"| **all** | {total['looped']:.1f} | {total['batched']:.1f} | "
                 f"{total['looped'] / max(total['batched'], 1e-9):.2f}x | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory made by `train.py pipeline`")
    parser.add_argument("--batches", type=int, default=1, help="test batches each attack runs on")
    parser.add_argument("--attacks", default=None, help="comma-separated names (default: every attack through the "
                        "defense and every mixed attack through it)")
    parser.add_argument("--max-images", type=int, default=None, help="images per network pass of the batched runs")
    parser.add_argument("--stack-groups", choices=("auto", "on", "off"), default="auto",
                        help="mixed batches' groups as one stack of runs (auto: off the CPU only)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default=None, help="result file name (default: attack_speed_<run name>)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files")
    args, overrides = parse_with_overrides(parser, argv)
    if args.batches < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    threads, cfg, paths, device = start_run_bench(args.run, args.threads, overrides)
    ev, b = cfg.eval, cfg.defense.batch_size
    through = {name: spec for name, spec in ev.attacks.items() if spec.threat == "defense"}
    mixed = {mixed_name(a, p): (ev.attacks[a], p) for a in ev.mixed_attacks for p in ev.mixed_fractions
             if ev.attacks[a].threat == "defense"}
    names = [*through, *mixed] if args.attacks is None else [n.strip() for n in args.attacks.split(",") if n.strip()]
    unknown = set(names) - set(through) - set(mixed)
    if unknown:
        raise SystemExit(f"error: {sorted(unknown)} are not attacks through the defense of {args.run}/config.yaml; "
                         f"expected some of {[*through, *mixed]}")
    defense = load_defense(paths.defense).to(device).eval()
    pool_x, pool_y = (t.to(device) for t in load_datamodule(cfg, paths).split_tensors("test"))
    if len(pool_y) < args.batches * b:
        raise SystemExit(f"error: {args.batches} batches of {b} need {args.batches * b} test images, the run has "
                         f"{len(pool_y)}")
    evaluator = DefenseEvaluator(defense, through, keep_images=False, with_clean=False, batch_size=b, draws=ev.draws,
                                 mixed=mixed, filler=(pool_x, pool_y)).to(device)
    machine = machine_description(device)
    stack_groups = {"auto": None, "on": True, "off": False}[args.stack_groups]
    rows = time_attacks(evaluator, names, pool_x, pool_y, b, args.batches, args.max_images, stack_groups)
    result = {"run": args.run.name, "batches": args.batches, "batch_size": b, "draws": ev.draws,
              "max_images": args.max_images, "stack_groups": args.stack_groups, "threads": threads, "machine": machine,
              "attacks": rows,
              "total_seconds": {mode: sum(row[mode]["seconds"] for row in rows.values()) for mode in MODES}}
    stem = args.name or f"attack_speed_{args.run.name}"
    atomic_write_json(result, args.results / f"{stem}.json")
    atomic_write_text(markdown(result), args.results / f"{stem}.md")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
