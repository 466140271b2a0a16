"""The GPU check (``make gpu-check``): the pipeline, the evaluation and the speed figures on a CUDA machine.

Steps, each a separate process (a DDP launch re-runs its command), timed, kept going when one fails:

- ``cpu_gpu_agreement``: :mod:`bench.device_agreement`: features, MMD scores, J and thresholds on fixed inputs,
  GPU against CPU, within its stated tolerances;
- ``digits_ddp_bf16``: ``train.py pipeline`` on ``configs/digits.yaml`` under DDP on ``--devices`` GPUs in
  bf16 mixed precision;
- ``eval_ddp``: ``eval.py`` on that run under DDP, on a small budget (100 test images, 50 through the defense);
- ``digits_fp32``: the same pipeline on one GPU in float32;
- ``digits_eval_gpu``: ``eval.py`` on that run on one GPU with the demo's budget (its seconds: the digits evaluation
  on one GPU, target <= 60 s);
- ``attack_speed``: :mod:`bench.attack_speed` on that run: one batch of every attack through the defense, the
  reference loop against the batched runs (``attack_speed_looped_s``, ``attack_speed_batched_s``);
- ``classifier_speed``: :mod:`bench.classifier_speed` on ``configs/cifar10_cpu.yaml`` (synthetic CIFAR-shaped
  data): the stage's images/s over a bare loop's, ``classifier_over_bare`` (target >= 0.8);
- ``throughput_cifar10_cpu``, ``throughput_cifar10_wrn28``: ``python -m bench.throughput --device cuda`` (every stage's
  step and the defense's inference, the paper configuration included);
- ``cifar10_cpu_training``: ``train.py pipeline`` on ``configs/cifar10_cpu.yaml`` with synthetic data (no files,
  no download) on one GPU, its training stages' seconds (classifier, AEs + kernel, denoiser; target <= 60 s).

Writes ``bench/results/gpu_check.json`` (and the steps' own ``gpu_check_*.json``) after every step: the device,
versions, ``steps`` (name, ``passed``, ``seconds``, what failed) and the figures above. ``--accelerator cpu
--quick`` runs the same steps on the CPU with tiny budgets (how the script itself is tested where no GPU is).

    make gpu-check            # python -m bench.gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.machine import RESULTS, machine_description, stage_summary, write_result

__all__ = ["Step", "steps", "run_check"]

REPO = Path(__file__).resolve().parents[1]
SPEED = "gpu_check_classifier_speed"
AGREEMENT = "gpu_check_device_agreement"
ATTACKS = "gpu_check_attack_speed"
"""The result files of the classifier speed, the device agreement and the attack speed steps."""
QUICK_DIGITS = ["--classifier.epochs", "1", "--kernel.steps", "5", "--denoiser.epochs", "1",
                "--defense.calibration_batches", "200", "--data.subset", "700", "--data.val_size", "100",
                "--data.test_size", "100", "--data.mmd_per_class", "5", "--defense.reference_size", "25",
                "--defense.batch_size", "25", "--attack.steps", "3"]
"""Tiny budgets of ``--quick``: the steps run end to end in seconds (what the CPU test of this script uses)."""
SMALL_EVAL = ["--eval.max_test", "100", "--eval.max_test_defense", "50", "--eval.sanity_samples", "50",
              "--eval.random_batches", "200", "--eval.plots", "false"]
QUICK_EVAL = ["--eval.max_test", "50", "--eval.max_test_defense", "25", "--eval.sanity_samples", "25",
              "--eval.random_batches", "50", "--eval.plots", "false", "--eval.detection_batch_sizes", "[10]",
              "--eval.mixed_fractions", "[0.2]", "--eval.transfer.attacks", "[]"]


@dataclass
class Step:
    """One command of the check, with what its success must leave behind."""

    name: str
    argv: list[str]
    expect: list[Path] = field(default_factory=list)
    timeout: int = 900


def steps(args: argparse.Namespace, work: Path) -> list[Step]:
    """The check's commands for ``args`` (accelerator, devices, quick), writing runs under ``work``."""
    py = sys.executable
    quick = args.quick
    trainer = ["--trainer.accelerator", args.accelerator, "--trainer.enable_progress_bar", "false"]
    ddp = [*trainer, "--trainer.strategy", "ddp", "--trainer.devices", str(args.devices)]
    digits = ["--config", "configs/digits.yaml", "--run.root", str(work), *(QUICK_DIGITS if quick else [])]
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    speed = ["--images", "2000", "--epochs", "1"] if quick else []
    throughput = (["--repeats", "2", "--inference-repeats", "2", "--warmup", "1", "--calibration-pool", "300"]
                  if quick else [])
    synthetic = ["--data.dataset", "synthetic", "--data.options", json.dumps({"num_train": 3000 if quick else 50_000})]
    cifar = ["--config", "configs/cifar10_cpu.yaml", "--run.root", str(work), "--run.name", "cifar10_cpu", *synthetic,
             *trainer, "--trainer.devices", "1",
             *(["--data.test_size", "500", "--data.calibration_size", "300", "--data.val_size", "200",
                "--data.denoiser_size", "300", "--data.mmd_per_class", "10", "--classifier.epochs", "1",
                "--kernel.steps", "3", "--denoiser.epochs", "1", "--purifier.kinds", "[]"] if quick else [])]
    run = work / "ddp_bf16"
    return [
        Step("cpu_gpu_agreement", [py, "-m", "bench.device_agreement", "--device", device, "--name", AGREEMENT,
                                   "--results", str(args.results)], [args.results / f"{AGREEMENT}.json"]),
        Step("digits_ddp_bf16", [py, "train.py", "pipeline", *digits, "--run.name", "ddp_bf16", *ddp,
                                 "--trainer.precision", "bf16-mixed"], [run / "defense.pt"]),
        Step("eval_ddp", [py, "eval.py", "--run", str(run), *ddp, *(QUICK_EVAL if quick else SMALL_EVAL)],
             [run / "report.json"]),
        Step("digits_fp32", [py, "train.py", "pipeline", *digits, "--run.name", "fp32", *trainer,
                             "--trainer.devices", "1", "--trainer.precision", "32-true"],
             [work / "fp32" / "defense.pt"]),
        Step("digits_eval_gpu", [py, "eval.py", "--run", str(work / "fp32"), *trainer, "--trainer.devices", "1",
                                 *(QUICK_EVAL if quick else ["--eval.plots", "false"])],
             [work / "fp32" / "report.json"]),
        Step("attack_speed", [py, "-m", "bench.attack_speed", "--run", str(work / "fp32"), *trainer,
                              "--trainer.devices", "1", "--name", ATTACKS, "--results", str(args.results),
                              *(["--attacks", "evade_clean_l2"] if quick else [])],
             [args.results / f"{ATTACKS}.json"]),
        Step("classifier_speed", [py, "-m", "bench.classifier_speed", "--config", "configs/cifar10_cpu.yaml",
                                  "--device", device, "--name", SPEED, "--results", str(args.results), *speed],
             [args.results / f"{SPEED}.json"]),
        *[Step(f"throughput_{name}", [py, "-m", "bench.throughput", "--config", f"configs/{name}.yaml", "--device",
                                      device, "--name", f"gpu_check_throughput_{name}", "--results",
                                      str(args.results), *throughput])
          for name in ("cifar10_cpu", "cifar10_wrn28")],
        Step("cifar10_cpu_training", [py, "train.py", "pipeline", *cifar], [work / "cifar10_cpu" / "defense.pt"]),
    ]


def _run(step: Step) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    start = time.perf_counter()
    try:
        done = subprocess.run(step.argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=step.timeout)
        code, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as err:
        code, stderr = -1, f"timed out after {step.timeout} s: {err.stderr or ''}"
    seconds = time.perf_counter() - start
    missing = [str(p) for p in step.expect if not p.is_file()]
    passed = code == 0 and not missing
    entry: dict[str, Any] = {"name": step.name, "passed": passed, "seconds": round(seconds, 1),
                             "command": " ".join(step.argv[1:])}
    if not passed:
        entry["failure"] = (f"exit code {code}" if code else f"missing {missing}") + ": " + (stderr or "")[-2000:]
    return entry


def _figures(work: Path, results: Path) -> dict[str, Any]:
    """The speed figures the steps left: the classifier's share of the bare loop, the attacks looped and batched, the
    digits evaluation's seconds, the CIFAR training seconds."""
    out: dict[str, Any] = {}
    speed = results / f"{SPEED}.json"
    if speed.is_file():
        result = json.loads(speed.read_text())
        keys = ("classifier_over_bare", "bare_images_per_second", "stage_images_per_second", "precision")
        out |= {key: result.get(key) for key in keys}
    agreement = results / f"{AGREEMENT}.json"
    if agreement.is_file():
        out["cpu_gpu_agreement"] = {name: q["max_relative_difference"]
                                    for name, q in json.loads(agreement.read_text())["quantities"].items()}
    attacks = results / f"{ATTACKS}.json"
    if attacks.is_file():
        total = json.loads(attacks.read_text())["total_seconds"]
        out |= {"attack_speed_looped_s": total["looped"], "attack_speed_batched_s": total["batched"]}
    report = work / "fp32" / "report.json"
    if report.is_file():
        out["digits_eval_seconds"] = json.loads(report.read_text())["timings_s"]["eval"]
    stages = {stage: summary.get("seconds") for stage in ("classifier", "kernel", "denoiser")
              if (summary := stage_summary(work / "cifar10_cpu", stage))}
    if stages:
        out["cifar10_cpu_training_seconds"] = {**stages, "total": sum(s for s in stages.values() if s is not None)}
    return out


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    result: dict[str, Any] = {"machine": machine_description(device), "accelerator": args.accelerator,
                              "devices": args.devices, "quick": args.quick, "steps": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        for step in steps(args, work):
            if args.only and step.name not in args.only:
                continue
            result["steps"].append(_run(step))
            result |= _figures(work, args.results)
            result["passed"] = all(s["passed"] for s in result["steps"])
            write_result(args.name, result, args.results)
            mark = "passed" if result["steps"][-1]["passed"] else "FAILED"
            print(f"{step.name}: {mark} in {result['steps'][-1]['seconds']} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--devices", type=int, default=None, help="GPUs of the DDP steps (default: all visible)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (the script's own test)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these steps")
    parser.add_argument("--name", default="gpu_check", help="result file name")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files")
    args = parser.parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        print("error: no CUDA device is visible: the GPU check needs one (--accelerator cpu --quick runs it on the "
              "CPU)", file=sys.stderr)
        return 2
    if args.devices is None:
        args.devices = torch.cuda.device_count() if args.accelerator == "gpu" else 1
    result = run_check(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "steps")}, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
