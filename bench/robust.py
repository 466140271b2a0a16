"""The robust-training leaderboard: each training method alone and with DAD, on one split under one attack suite.

For every method of ``--methods`` the pipeline of ``--config`` runs with ``classifier.training`` set to it (run
``<run root>/<config's run name>_<method>``; finished stages are kept, so an interrupted leaderboard resumes),
then the evaluation runs twice with the config's attacks, test images and budgets:

* **with DAD**: the saved defense (``report.json``): the full white box, detector evasion and mixed batches;
* **alone**: the same defense file under routing ``never`` (``report_never.json``), i.e. the backbone alone
  under every attack of the suite (an attack through the defense meets the classifier only). Mixed batches
  are left out there: a classifier in eval mode classifies each image independently of its batch, so a
  mixed batch is the whole-batch attack again.

Per row: clean accuracy, AutoAttack (standard version, on the classifier; ``--autoattack`` names the attack),
the worst case (the headline of the report: the lowest of the per-sample union over all attacks, the stronger
sanity re-runs and, with DAD, the mixed batches), each with its 95% interval; the clean FPR (with DAD); the
classifier stage's time and backward passes per sample (with DAD: every stage's time). Per method also DAD's
worst case minus the backbone's with its paired 95% interval (Newcombe) on the images both cover. Writes
``bench/results/<name>.json`` and ``<name>.md`` (the README table).

    python -m bench.robust --config configs/digits_robust.yaml --methods standard pgd_at trades fat gairat

Any other ``--<section>.<option> VALUE`` is a configuration override, as with ``train.py`` (e.g. ``--run.name
digits_robust_route --denoiser.adv_steps 5``: the leaderboard with the denoiser trained against its route).

``--route-rows`` makes the route leaderboard of :mod:`bench.route_rows` instead (alone, DAD with the denoiser
trained against its route, DAD with the route the defense stage selected; ``--published`` adds DAD with the
published denoiser), e.g. ``--route-rows --run.name cifar10_cpu_robust_route --data.selection_size 200
--denoiser.adv_steps 5 --defense.select.routes '[denoiser, identity]'``.

Methods run as separate invocations (one per process or per session, each with its own ``--name``) become one
table with ``--merge``, which reads the saved results and reruns nothing:

    python -m bench.robust --merge robust_leaderboard_cifar10_cpu_robust_standard \
        robust_leaderboard_cifar10_cpu_robust_pgd_at --name robust_leaderboard_cifar10_cpu_robust
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.leaderboard import evaluate_unless_saved, leaderboard_rows
from bench.machine import RESULTS, configure_threads, machine_description, parse_with_overrides, pct, write_result
from bench.route_rows import route_method
from dad.training import TRAINING_METHODS
from pipeline.config import load_config
from pipeline.stages import run_pipeline
from pipeline.trainer import quiet_third_party, run_device

__all__ = ["main", "leaderboard_rows", "merge"]

_LABELS = {"standard": "standard", "pgd_at": "PGD-AT", "trades": "TRADES", "fat": "FAT", "fat_trades": "FAT-TRADES",
           "gairat": "GAIRAT", "gair_fat": "GAIR-FAT"}
_ORDER = {method: i for i, method in enumerate(TRAINING_METHODS)}  # the table's row order: the registry's


def _ci(value: float | None, ci: list[float] | None) -> str:
    return "-" if value is None or ci is None else f"{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def markdown(result: dict[str, Any]) -> str:
    """The README table of a leaderboard."""
    lines = [f"Threat model {result['threat']}; {result['config']}; accuracies in % with 95% intervals.", "",
             "| method | setting | clean | AutoAttack (classifier) | worst case | clean FPR | training s | "
             "backward passes / sample |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        passes = "-" if r["backward_passes_per_sample"] is None else f"{r['backward_passes_per_sample']:.2f}"
        label = _LABELS.get(r["method"], r["method"])
        setting = r["setting"] + (f" (route kept: {r['route']})" if r.get("route") else "") + (
            ": the backbone's logits, = alone by construction" if r.get("measured") is False else "")
        lines.append(f"| {label} | {setting} | {_ci(r['clean_acc'], r['clean_ci95'])} | "
                     f"{_ci(r['autoattack'], r['autoattack_ci95'])} | "
                     f"{_ci(r['worst_case'], r['worst_case_ci95'])} (n={r['worst_case_n']}) | {pct(r['clean_fpr'])} "
                     f"| {r['training_seconds']:.0f} | {passes} |")
    lines += ["", "DAD's worst case minus the backbone's alone (paired 95% interval):", ""]
    for d in result["differences"]:
        others = "".join(f"; {label} {_points(d[key + '_minus_alone'], d[key + '_ci95'])}"
                         for key, label in (("published", "published denoiser"), ("selected", "selected route"))
                         if key + "_minus_alone" in d)
        lines.append(f"- {_LABELS.get(d['method'], d['method'])}: {_points(d['dad_minus_alone'], d['ci95'])} points "
                     f"(n={d['n']}){others}")
    return "\n".join(lines) + "\n"


def _points(value: float, ci: list[float]) -> str:
    return f"{100 * value:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def merge(results: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One leaderboard from saved ones (``names`` label them) of the same config and threat model.

    Each source keeps its command, threads and machine, since the training times of rows measured under
    different thread counts are not comparable; a merged leaderboard merges again (a method added later).
    Sources must not repeat a method. Rows are in the order ``classifier.training`` lists the methods, whatever
    order the sources came in, so a method run later takes its place in the table.
    """
    first = results[0]
    for name, result in zip(names, results):
        for key in ("config", "threat"):
            if result[key] != first[key]:
                raise ValueError(f"Cannot merge {name}: its {key} is {result[key]!r}, {names[0]}'s {first[key]!r}")
    methods = [d["method"] for result in results for d in result["differences"]]
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ValueError(f"Cannot merge: methods {repeated} appear in more than one of {names}")
    return {"config": first["config"], "threat": first["threat"],
            "rows": sorted((row for result in results for row in result["rows"]), key=_row_order),
            "differences": sorted((d for result in results for d in result["differences"]), key=_row_order),
            "wall_seconds_this_invocation": {m: s for result in results
                                             for m, s in result["wall_seconds_this_invocation"].items()},
            "sources": [source for name, result in zip(names, results) for source in _sources(name, result)]}


def _row_order(entry: dict[str, Any]) -> int:
    """A row's or difference's place in the table: its method's in ``classifier.training``, unknown ones last."""
    return _ORDER.get(entry["method"], len(_ORDER))


def _sources(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Where a saved leaderboard's rows came from: itself, or the sources of an earlier merge."""
    if "sources" in result:
        return result["sources"]
    return [{"name": name, "command": result["command"], "threads": result["threads"], "machine": result["machine"]}]


def _read_result(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"No saved leaderboard {path} (--merge takes result names, as --name wrote them)")
    return json.loads(path.read_text())


def _write(name: str, result: dict[str, Any]) -> None:
    write_result(name, result, RESULTS)
    (RESULTS / f"{name}.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a robust configuration (configs/*_robust.yaml); required unless --merge")
    parser.add_argument("--methods", nargs="+", default=["standard", "pgd_at", "trades", "fat", "gairat"],
                        choices=list(TRAINING_METHODS), help="training methods of dad.training, each a row pair")
    parser.add_argument("--data-root", default=None, help="--data.root of the config (image folders)")
    parser.add_argument("--runs-root", default=None, help="where the runs go (default: the config's run.root)")
    parser.add_argument("--autoattack", default="autoattack_linf", help="the config's AutoAttack entry")
    parser.add_argument("--threat", default=None, help="the threat model of the table (default: the first Linf)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default=None, help="result name (default: robust_leaderboard_<config stem>)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="NAME",
                        help="merge these saved results (bench/results/NAME.json) into --name; runs nothing")
    parser.add_argument("--route-rows", action="store_true",
                        help="the route leaderboard (bench.route_rows): alone, DAD with the route-trained denoiser and "
                             "with the selected route, the published route's AEs transferred as a masking check")
    parser.add_argument("--published", action="store_true",
                        help="with --route-rows, also evaluate DAD with the published denoiser (a row of its own)")
    parser.add_argument("--select-published", action="store_true",
                        help="with --route-rows, the published denoiser is a candidate of the defense stage's "
                             "selection")
    parser.add_argument("--parallel-evals", action="store_true",
                        help="with --route-rows, the backbone-alone evaluation in a second process (on 2 cores, "
                             "give each process one thread: --threads 1)")
    args, overrides = parse_with_overrides(parser, argv)
    if (args.published or args.select_published or args.parallel_evals) and not args.route_rows:
        parser.error("--published, --select-published and --parallel-evals are options of --route-rows")
    if args.merge is not None:
        if args.name is None:
            parser.error("--merge needs --name (the merged result's name)")
        if overrides:
            parser.error(f"--merge reruns nothing, so it takes no configuration overrides: {overrides}")
        result = merge([_read_result(name) for name in args.merge], args.merge)
        _write(args.name, result)
        return result
    if args.config is None:
        parser.error("--config is required (or --merge)")
    threads = configure_threads(args.threads)
    quiet_third_party()
    locations = [*(["--data.root", args.data_root] if args.data_root else []),
                 *(["--run.root", args.runs_root] if args.runs_root else [])]
    base = load_config(args.config, [*overrides, *locations])
    rows, differences, seconds = [], [], {}
    for method in args.methods:
        cfg = replace(base, run=replace(base.run, name=f"{base.run.name}_{method}"),
                      classifier=replace(base.classifier, training=method))
        start = time.perf_counter()
        if args.route_rows:
            method_rows, difference = route_method(cfg, method, args.threat, args.autoattack, args.published,
                                                   args.select_published, args.parallel_evals)
        else:
            run_pipeline(cfg)
            evaluate_unless_saved(cfg)
            evaluate_unless_saved(cfg, "never")
            method_rows, difference = leaderboard_rows(cfg.run.dir, method, args.threat, args.autoattack)
        seconds[method] = time.perf_counter() - start
        rows += method_rows
        differences.append(difference)
        print(f"{method}: " + "; ".join(f"{r['setting']} clean {pct(r['clean_acc'])}, worst {pct(r['worst_case'])}"
                                        for r in method_rows), flush=True)
    name = args.name or f"robust_leaderboard_{Path(args.config).stem}"
    result = {"config": args.config, "threat": differences[0]["threat"], "rows": rows, "differences": differences,
              "wall_seconds_this_invocation": seconds, "machine": machine_description(run_device(base.trainer)),
              "threads": threads, "command": " ".join(["python -m bench.robust", *(argv or sys.argv[1:])])}
    _write(name, result)
    return result


if __name__ == "__main__":
    main()
