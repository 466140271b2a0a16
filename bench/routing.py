"""The routing modes side by side on one trained run: clean, all-adversarial and mixed batches, and their cost.

    OMP_NUM_THREADS=2 python -m bench.routing --run runs/demo
    OMP_NUM_THREADS=2 python -m bench.routing --run runs/cifar10_cpu --max-test 1000
    python -m bench.routing --run runs/cifar10_cpu --trainer.accelerator gpu --trainer.devices 1

Classifier-only AEs (the run's ``eval.attacks.pgd_linf``, crafted once on the classifier with the evaluation's
seeds: they do not depend on the routing) of the first ``--max-test`` test images are then classified by the
saved defense under each routing (``batch``, ``sample``, ``both``, and the baselines ``never`` and ``always``),
in batches of ``defense.batch_size`` and ``eval.draws`` noise draws (a sample counts only if right in every
draw):

* clean: the clean images, and the share of clean images purified (by either test) in ``--random-batches``
  random batches of the whole test split;
* all-adversarial: every image of each batch an AE;
* mixed: ``round(f * B)`` AEs per batch completed with clean filler drawn from the other test images (every AE
  appears once per fraction); the accuracy on the AE part and the share of AEs purified.

This is the issue's routing table; the attacks that know the routing (detector evasion, per-sample evasion, soft
routing) are the evaluation's (``eval.py --run RUN --eval.routing MODE``). Any other ``--<section>.<option> VALUE``
overrides the run's saved ``config.yaml``, as with ``train.py``: the trainer flags (``--trainer.accelerator gpu``
...) choose the device everything runs on. Writes ``bench/results/routing_<run name>.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


from bench.machine import RESULTS, machine_description, parse_with_overrides, start_run_bench
from dad.attacks import AttackSpec, run_seeded, target_of
from dad.attacks.judging import with_filler
from dad.defense import DADDefense
from dad.defense_file import load_defense
from dad.io import atomic_write_json
from dad.routing import ROUTINGS
from dad.stats import accuracy_interval
from pipeline.stages import load_datamodule

log = logging.getLogger("bench.routing")

FRACTIONS = (0.1, 0.25, 0.5)


@torch.no_grad()
def judge(defense: DADDefense, x: Tensor, y: Tensor, draws: int, part: int | None = None) -> tuple[Tensor, Tensor]:
    """Per image of ``x[:part]``: right in every one of ``draws`` draws, and purified (in the first draw)."""
    out = defense.forward_draws(x, draws)
    part = len(x) if part is None else part
    right = (out.logits.argmax(2)[:, :part] == y[:part]).all(0)
    flags = out.flags if out.flags is not None else out.adversarial.expand(len(x))
    return right.cpu(), flags[:part].cpu()


def classifier_aes(spec: AttackSpec, defense: DADDefense, x: Tensor, y: Tensor) -> Tensor:
    """AEs of ``x`` by a classifier-only ``spec``, in batches of ``spec.batch_size`` with the evaluation's seeds."""
    b = spec.batch_size
    return torch.cat([run_seeded(spec, target_of(spec, defense), xb, yb, chunk=i)
                      for i, (xb, yb) in enumerate(zip(x.split(b), y.split(b)))])


def whole_batches(defense: DADDefense, x: Tensor, y: Tensor, b: int, draws: int) -> tuple[Tensor, Tensor]:
    """:func:`judge` over consecutive batches of ``b`` images."""
    parts = [judge(defense, xb, yb, draws) for xb, yb in zip(x.split(b), y.split(b))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def mixed_batches(defense: DADDefense, aes: Tensor, y: Tensor, pool: tuple[Tensor, Tensor], b: int, fraction: float,
                  draws: int, seed: int) -> tuple[Tensor, Tensor]:
    """Every AE once, ``round(fraction * b)`` per batch beside clean filler from test images other than its own.

    The filler is drawn on the CPU (the same batches on every device), then moved to the images' device.
    """
    k = max(1, round(fraction * b))
    pool_x, pool_y = pool
    generator = torch.Generator().manual_seed(seed)
    right, flagged = [], []
    for start in range(0, len(aes), k):
        idx = torch.arange(start, min(start + k, len(aes)))
        others = torch.randperm(len(pool_x), generator=generator)
        others = others[~torch.isin(others, idx)][: b - len(idx)]
        idx, others = idx.to(aes.device), others.to(pool_x.device)
        batch = with_filler(aes[idx], pool_x[others])
        r, f = judge(defense, batch, torch.cat([y[idx], pool_y[others]]), draws, part=len(idx))
        right.append(r)
        flagged.append(f)
    return torch.cat(right), torch.cat(flagged)


@torch.no_grad()
def purified_share(defense: DADDefense, pool: Tensor, b: int, batches: int, seed: int) -> float:
    """The share of clean images purified, over ``batches`` random batches of ``b`` distinct pool images (drawn on
    the CPU: the same batches on every device)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(b, dtype=torch.long, device=pool.device)  # placeholders: only the flags are kept
    flagged = 0.0
    for _ in range(batches):
        batch = pool[torch.randperm(len(pool), generator=generator)[:b].to(pool.device)]
        flagged += judge(defense, batch, labels, 1)[1].double().mean().item()
    return flagged / batches


def _entry(correct: Tensor) -> dict[str, Any]:
    return {"acc": correct.double().mean().item(), "ci95": list(accuracy_interval(correct)), "n": correct.numel()}


def table_markdown(result: dict[str, Any]) -> str:
    fractions = result["settings"]["fractions"]
    lines = ["| routing | clean acc | clean purified | PGD, all-AE batches | "
             + " | ".join(f"PGD, {f:.0%} AEs per batch (AE part; purified)" for f in fractions) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in fractions) + " |"]
    for mode, r in result["routings"].items():
        mixed = " | ".join(f"{r['mixed'][str(f)]['acc']:.3f} ({r['mixed'][str(f)]['purified']:.3f})"
                           for f in fractions)
        lines.append(f"| {mode} | {r['clean']['acc']:.3f} | {r['clean_purified']:.3f} | {r['adversarial']['acc']:.3f} "
                     f"| {mixed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory made by `train.py pipeline`")
    parser.add_argument("--max-test", type=int, default=None, help="AEs for the first N test images (default: all)")
    parser.add_argument("--attack", default="pgd_linf", help="a classifier-only attack of the run's eval section")
    parser.add_argument("--routings", default=",".join(ROUTINGS), help="comma-separated routing modes")
    parser.add_argument("--random-batches", type=int, default=1000,
                        help="random clean batches of the test split for the share of clean images purified")
    parser.add_argument("--threads", type=int, default=None)
    args, overrides = parse_with_overrides(parser, argv)
    threads, cfg, paths, device = start_run_bench(args.run, args.threads, overrides)
    if args.attack not in cfg.eval.attacks or cfg.eval.attacks[args.attack].threat != "classifier":
        raise SystemExit(f"error: `{args.attack}` is not a classifier-only attack of {args.run}/config.yaml")
    routings = [m.strip() for m in args.routings.split(",") if m.strip()]
    if set(routings) - set(ROUTINGS):
        raise SystemExit(f"error: unknown routings {sorted(set(routings) - set(ROUTINGS))}; expected {ROUTINGS}")
    defense = load_defense(paths.defense).to(device).eval()
    saved_routing = defense.routing
    pool_x, pool_y = (t.to(device) for t in load_datamodule(cfg, paths).split_tensors("test"))
    n = len(pool_y) if args.max_test is None else min(args.max_test, len(pool_y))
    x, y, b, draws = pool_x[:n], pool_y[:n], cfg.defense.batch_size, cfg.eval.draws
    spec = replace(cfg.eval.attacks[args.attack], batch_size=b)
    log.info("crafting %s on the classifier for %d test images", args.attack, n)
    aes = classifier_aes(spec, defense, x, y)
    with torch.no_grad():
        undefended = {"clean": _entry(defense.classifier(x).argmax(1) == y),
                      "adversarial": _entry(defense.classifier(aes).argmax(1) == y)}
    rows = {}
    for mode in routings:
        defense.routing = mode
        log.info("routing %s", mode)
        clean, _ = whole_batches(defense, x, y, b, draws)
        adversarial, adversarial_flags = whole_batches(defense, aes, y, b, draws)
        mixed = {}
        for f in FRACTIONS:
            right, flags = mixed_batches(defense, aes, y, (pool_x, pool_y), b, f, draws, cfg.run.seed)
            mixed[str(f)] = {**_entry(right), "purified": flags.double().mean().item()}
        rows[mode] = {"clean": _entry(clean),
                      "clean_purified": purified_share(defense, pool_x, b, args.random_batches, cfg.run.seed),
                      "adversarial": _entry(adversarial),
                      "adversarial_purified": adversarial_flags.double().mean().item(), "mixed": mixed}
    result = {
        "machine": machine_description(device),
        "settings": {"run": str(args.run), "attack": spec.as_dict(), "n": n, "batch_size": b, "draws": draws,
                     "fractions": list(FRACTIONS), "random_batches": args.random_batches,
                     "saved_routing": saved_routing, "threads": threads},
        "undefended": undefended,
        "routings": rows,
    }
    atomic_write_json(result, RESULTS / f"routing_{args.run.name}.json")
    print(table_markdown(result))
    return result


if __name__ == "__main__":
    main()
