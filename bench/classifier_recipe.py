"""The classifier stage of CIFAR-10 CPU scale, the fast recipe against the one before it, in one run.

Trains the classifier stage of ``--config`` (the fast recipe, once per seed) and of ``--before`` (the recipe
it replaces) on the same machine, one after the other, and records per run the stage's wall time, the
epochs, the training images, images/s (epochs x training images / fit time), the validation accuracy and
the accuracy on the whole test split (never seen by the stage). Any other ``--<section>.<option> VALUE`` overrides
both recipes, as with ``train.py``: the trainer flags (``--trainer.accelerator gpu --trainer.devices 1
--trainer.precision bf16-mixed`` ...) choose the machine they train on. Writes ``bench/results/<name>.json``.

    OMP_NUM_THREADS=2 python -m bench.classifier_recipe --root DIR/cifar10-jpeg/train --seeds 0 1 2
    python -m bench.classifier_recipe --root DIR/cifar10-jpeg/train --trainer.accelerator gpu --trainer.devices 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from typing import Any

import torch


from bench.machine import configure_threads, machine_description, parse_with_overrides, write_result
from pipeline.config import PipelineConfig, load_config
from pipeline.paths import RunPaths
from pipeline.networks import RunNetworks
from pipeline.stages import load_datamodule, run_stage
from pipeline.trainer import quiet_third_party, run_device


@torch.no_grad()
def _test_accuracy(cfg: PipelineConfig) -> float:
    """The trained classifier's accuracy on the test split, on the run's device."""
    paths, device = RunPaths(cfg.run.dir), run_device(cfg.trainer)
    model = RunNetworks(cfg, paths).classifier.to(device)
    x, y = (t.to(device) for t in load_datamodule(cfg, paths).split_tensors("test"))
    right = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(500), y.split(500)))
    return right / len(y)


def _run(cfg: PipelineConfig, label: str, seed: int, root: str, data_root: str) -> dict[str, Any]:
    cfg = replace(cfg, run=replace(cfg.run, name=f"{label}_seed{seed}", root=root, seed=seed),
                  data=replace(cfg.data, root=data_root),
                  trainer={**cfg.trainer, "enable_progress_bar": False})
    start = time.perf_counter()
    summary = run_stage(cfg, "classifier")
    wall = time.perf_counter() - start
    row = {"recipe": label, "seed": seed, "stage_seconds": wall, "test_acc": _test_accuracy(cfg),
           "classifier": {k: v for k, v in vars(cfg.classifier).items()}, **summary}
    print(f"{label} seed {seed}: test {row['test_acc']:.4f}, val {row['val_acc']:.4f}, {wall:.0f} s, "
          f"{row['images_per_second']:.0f} img/s", flush=True)
    return row


def _result(rows: list[dict[str, Any]], threads: int, device: torch.device) -> dict[str, Any]:
    fast = [r for r in rows if r["recipe"] == "fast"] or [{"test_acc": float("nan"), "stage_seconds": float("nan")}]
    return {
        "machine": machine_description(device),
        "threads": threads,
        "runs": rows,
        "fast_test_acc_mean": statistics.mean(r["test_acc"] for r in fast),
        "fast_test_acc_seeds": [r["test_acc"] for r in fast],
        "fast_stage_seconds_max": max(r["stage_seconds"] for r in fast),
        "target": {"test_acc_mean": 0.80, "stage_seconds": 25 * 60},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the CIFAR-10 image folder (DIR/<class>/*.jpg)")
    parser.add_argument("--config", default="configs/cifar10_cpu.yaml", help="the fast recipe")
    parser.add_argument("--before", default="bench/recipes/cifar10_cpu_before.yaml", help="the recipe it replaces")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-before", action="store_true", help="time the fast recipe only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="classifier_recipe")
    args, overrides = parse_with_overrides(parser, argv)
    threads = configure_threads(args.threads)
    quiet_third_party()
    device = run_device(load_config(args.config, overrides).trainer)  # the fast recipe's: the machine recorded
    rows: list[dict[str, Any]] = []
    runs = [("before", args.before, args.seeds[0])] * (not args.skip_before) + [
        ("fast", args.config, seed) for seed in args.seeds]
    with tempfile.TemporaryDirectory() as root:
        for label, config, seed in runs:
            rows.append(_run(load_config(config, overrides), label, seed, root, args.root))
            result = _result(rows, threads, device)
            path = write_result(args.name, result)  # after every run: an interrupted benchmark keeps what it measured
    print(f"fast recipe: mean test accuracy {result['fast_test_acc_mean']:.4f} over seeds {args.seeds}, "
          f"slowest stage {result['fast_stage_seconds_max']:.0f} s -> {path}")
    return result


if __name__ == "__main__":
    main()
