"""Per-sample detection quality and cost against the size of the witness's stored sets, on the validation split.

    OMP_NUM_THREADS=2 python -m bench.witness_size --run runs/cifar10_cpu --sizes 50,100,200,500
    python -m bench.witness_size --run runs/cifar10_cpu --trainer.accelerator gpu --trainer.devices 1

The per-sample witness (:mod:`dad.sample_detector`) compares each image with the stored clean images and their
training AEs, so its cost grows linearly with ``defense.witness_size`` (the images kept of each set). This bench
chooses that size without touching the test split: for each size it keeps the same seeded subset the pipeline
keeps (``pipeline.defense._witness_sets``) of the saved defense's stored sets, calibrates the per-sample
threshold on the calibration split (as the pipeline does), and measures on the *validation* split:

* AUROC of the per-sample score, clean images against their classifier-only AEs (the run's
  ``eval.attacks.pgd_linf``: unseen by the witness, whose AEs come from the training attack);
* the share of AEs and of clean images flagged at the calibrated threshold (TPR, FPR);
* under ``sample`` routing with that detector, the accuracy on the AE part of batches that mix 10% AEs into
  clean validation images (:func:`bench.routing.mixed_batches`);
* the time of one score of a clean batch of ``defense.batch_size`` (features given: the classifier's pass is
  shared), median of ``--repeats`` calls, against the bare classifier on that batch.

Any other ``--<section>.<option> VALUE`` overrides the run's saved ``config.yaml``, as with ``train.py``: the trainer
flags (``--trainer.accelerator gpu`` ...) choose the device everything runs on. Writes
``bench/results/witness_size_<run name>.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


from bench.machine import RESULTS, machine_description, median_ms, parse_with_overrides, start_run_bench
from bench.routing import classifier_aes, mixed_batches
from dad.defense import DADDefense
from dad.defense_file import load_defense
from dad.io import atomic_write_json
from dad.metrics import auroc
from dad.sample_detector import SampleDetector
from pipeline.stages import load_datamodule

log = logging.getLogger("bench.witness_size")


def subset(stored: SampleDetector, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """The pipeline's seeded choice of ``size`` clean images and their AEs from the stored sets (drawn on the CPU, as
    the pipeline draws it, whatever the sets' device)."""
    clean, adversarial = stored.clean, stored.adversarial
    if size >= len(clean):
        return clean, adversarial
    keep = torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))[:size].to(clean.device)
    return clean[keep], adversarial[keep]


@torch.no_grad()
def measure(defense: DADDefense, detector: SampleDetector, calibration: Tensor, val: tuple[Tensor, Tensor],
            aes: Tensor, batch_size: int, draws: int, seed: int, repeats: int) -> dict[str, Any]:
    """Calibrate ``detector``, then its quality on the validation split and its cost per batch (timed on the
    device of ``x``)."""
    x, y = val
    detector.calibrate(calibration, defense.target_fpr)
    clean_scores, ae_scores = detector.scores(x), detector.scores(aes)
    defense.sample_detector, defense.routing = detector, "sample"
    right, purified = mixed_batches(defense, aes, y, (x, y), batch_size, 0.1, draws, seed)
    batch = x[:batch_size]
    features = defense.classify_with_features(batch)[1]
    return {"auroc": auroc(clean_scores, ae_scores), "tpr": detector.decide(ae_scores).double().mean().item(),
            "fpr": detector.decide(clean_scores).double().mean().item(),
            "mixed_10pct_ae_acc": right.double().mean().item(),
            "mixed_10pct_ae_purified": purified.double().mean().item(),
            "score_ms": median_ms(lambda: detector.scores(batch, features), repeats, x.device)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory made by `train.py pipeline`")
    parser.add_argument("--sizes", default="25,50,100,200,500", help="comma-separated witness sizes")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per size")
    parser.add_argument("--threads", type=int, default=None)
    args, overrides = parse_with_overrides(parser, argv)
    threads, cfg, paths, device = start_run_bench(args.run, args.threads, overrides)
    defense = load_defense(paths.defense).to(device).eval()
    stored = defense.sample_detector
    if stored is None:
        raise SystemExit(f"error: {paths.defense} has no per-sample detector")
    dm = load_datamodule(cfg, paths)
    calibration = dm.split_tensors(dm.splits.calibration_split)[0].to(device)
    x, y = (t.to(device) for t in dm.split_tensors("val"))
    b = cfg.defense.batch_size
    spec = replace(cfg.eval.attacks["pgd_linf"], batch_size=b)
    log.info("crafting pgd_linf on the classifier for %d validation images", len(x))
    aes = classifier_aes(spec, defense, x, y)
    with torch.no_grad():
        bare_ms = median_ms(lambda: defense.classifier(x[:b]), args.repeats, device)
    rows = {}
    for size in sorted({min(int(s), len(stored.clean)) for s in args.sizes.split(",")}):
        log.info("witness size %d", size)
        detector = SampleDetector(stored.kernel, *subset(stored, size, cfg.run.seed), stored.kind).to(device)
        rows[str(size)] = measure(defense, detector, calibration, (x, y), aes, b, cfg.eval.draws, cfg.run.seed,
                                  args.repeats)
        rows[str(size)]["score_over_bare"] = rows[str(size)]["score_ms"] / bare_ms
    result = {"machine": machine_description(device),
              "settings": {"run": str(args.run), "attack": spec.as_dict(), "n_val": len(x), "batch_size": b,
                           "stored_size": len(stored.clean), "calibration_images": len(calibration),
                           "threads": threads},
              "bare_classifier_ms": bare_ms, "sizes": rows}
    atomic_write_json(result, RESULTS / f"witness_size_{args.run.name}.json")
    print("| witness size | AUROC | TPR | FPR | mixed 10% AE acc (purified) | score ms (/ bare) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size, r in rows.items():
        print(f"| {size} | {r['auroc']:.3f} | {r['tpr']:.3f} | {r['fpr']:.3f} | {r['mixed_10pct_ae_acc']:.3f} "
              f"({r['mixed_10pct_ae_purified']:.3f}) | {r['score_ms']:.2f} ({r['score_over_bare']:.3f}) |")
    return result


if __name__ == "__main__":
    main()
