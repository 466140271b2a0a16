"""The clean false-positive rate of a saved defense on images no stage of its run has read.

An ImageFolder run with ``data.options.max_per_class K`` reads only the first K files (sorted) of every class;
the files after them are fresh draws of the same distribution. This scores random batches of a seeded sample of
those files against the saved detector's threshold: an estimate of the deployed FPR independent of the run's
own test split (and of its calibration pool).

    OMP_NUM_THREADS=2 python -m bench.fresh_fpr --run runs/cifar10_cpu --root DIR/cifar10-jpeg/train --skip 2800
    python -m bench.fresh_fpr --run runs/cifar10_cpu --root DIR/cifar10-jpeg/train --skip 2800 \
        --trainer.accelerator gpu --trainer.devices 1

Any other ``--<section>.<option> VALUE`` overrides the run's saved ``config.yaml``, as with ``train.py``: the trainer
flags (``--trainer.accelerator gpu`` ...) choose the device the images are scored on. Writes
``bench/results/<name>.json`` (default ``fresh_fpr``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch


from bench.machine import machine_description, parse_with_overrides, start_run_bench, write_result
from dad.defense_file import load_defense
from datamodules.base import to_float
from datamodules.image_files import decode_images, index_folders


def fresh_images(root: Path, skip: int, size: int, seed: int) -> torch.Tensor:
    """``size`` images drawn (seeded) from the files after the first ``skip`` (sorted) of every class."""
    index = index_folders(root)
    seen: dict[int, int] = {}
    files = []
    for path, label in zip(index.train_files, index.train_labels):  # in sorted order within each class
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > skip:
            files.append(path)
    if len(files) < size:
        raise SystemExit(f"error: only {len(files)} images after the first {skip} of each class; need {size}")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:size]
    return to_float(decode_images([files[i] for i in order.tolist()], desc="decoding fresh images"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory made by `train.py pipeline`")
    parser.add_argument("--root", type=Path, required=True, help="ImageFolder directory (<class>/<image>)")
    parser.add_argument("--skip", type=int, required=True, help="files per class the run read (max_per_class)")
    parser.add_argument("--size", type=int, default=10000, help="fresh images in the pool")
    parser.add_argument("--batches", type=int, default=2000, help="random batches per batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="fresh_fpr")
    parser.add_argument("--threads", type=int, default=None)
    args, overrides = parse_with_overrides(parser, argv)
    threads, _, paths, device = start_run_bench(args.run, args.threads, overrides)
    defense = load_defense(paths.defense).to(device)
    detector = defense.detector
    pool = fresh_images(args.root, args.skip, args.size, args.seed).to(device)
    scorer = detector.batch_scorer(pool)
    rates = {}
    for b in detector.batch_sizes.tolist():
        scores = scorer(b, args.batches, torch.Generator().manual_seed(b))
        rates[str(b)] = (scores > detector.threshold_for(b)).float().mean().item()
    result = {
        "machine": machine_description(device),
        "settings": {"run": str(args.run), "skip_per_class": args.skip, "pool": args.size, "batches": args.batches,
                     "seed": args.seed, "threads": threads},
        "target_fpr": defense.target_fpr,
        "fpr_fresh": rates,
    }
    write_result(args.name, result)
    print(rates)
    return result


if __name__ == "__main__":
    main()
