"""The detector's statistics on fixed inputs: the same on an accelerator as on the CPU, within a stated tolerance.

A defense of ``configs/cifar10_cpu.yaml``'s architectures (random weights, fixed seed) and fixed random inputs are
built on the CPU; the features, batch MMD scores, per-sample scores, the J statistic of a (clean, perturbed) pair
and the calibrated thresholds (batch, per-sample and joint; the calibration batches are drawn by a CPU generator,
so both devices score the same batches) are computed on the CPU and again on ``--device``. Written per quantity:
the largest relative difference, and whether it is within the tolerance. The tolerances allow for TF32
convolutions (PyTorch's default on Ampere and later GPUs) in the features; the statistics are computed in
float32 from those features on both devices.

    python -m bench.device_agreement --device cuda
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.machine import RESULTS, machine_description, write_result
from dad.defense import DADDefense
from dad.denoisers import UNetDenoiser
from dad.detector import MMDDetector
from dad.kernels import SemanticKernel
from dad.mmd import j_statistic
from dad.models import create_model, freeze
from dad.purification import DenoiserPurifier
from dad.sample_detector import SampleDetector

__all__ = ["TOLERANCES", "statistics", "compare"]

TOLERANCES = {"features": 1e-2, "batch_scores": 2e-2, "sample_scores": 2e-2, "j": 2e-2, "thresholds": 2e-2,
              "sample_threshold": 2e-2, "joint_thresholds": 2e-2}
"""Largest relative difference accepted per quantity (relative to the CPU values' largest magnitude)."""


def _defense(generator: torch.Generator) -> DADDefense:
    classifier = freeze(create_model("cifar_resnet18_small", num_classes=10, in_channels=3))
    kernel = SemanticKernel(classifier, sigma_phi=10.0, sigma_q=2 * 32 * 32)
    reference = torch.rand(100, 3, 32, 32, generator=generator)
    witness = torch.rand(50, 3, 32, 32, generator=generator)
    detector = MMDDetector(kernel, reference)
    sample = SampleDetector(kernel, witness, (witness + 0.1).clamp(0, 1))
    denoiser = UNetDenoiser(in_channels=3, enc_widths=(8, 16), enc_depths=(1, 1), dec_widths=(8,), dec_depths=(1,))
    return DADDefense(classifier, detector, DenoiserPurifier(denoiser.eval()), sample_detector=sample,
                      routing="both").eval()


@torch.no_grad()
def statistics(defense: DADDefense, pool: Tensor, batches: Tensor, seed: int) -> dict[str, Tensor]:
    """The quantities compared, on the defense's device (``pool``, ``batches``: the fixed inputs, on the CPU)."""
    device = defense.detector.reference.device
    pool, batches = pool.to(device), batches.to(device)
    detector, sample = defense.detector, defense.sample_detector
    assert sample is not None
    features = detector.kernel.features(batches.flatten(0, 1))
    scores = torch.stack([detector.score(b) for b in batches])
    clean, perturbed = batches[0], (batches[0] + 0.03 * torch.sign(batches[1] - 0.5)).clamp(0, 1)
    generator = torch.Generator().manual_seed(seed)
    thresholds = detector.estimate(pool, [25, 50], 400, generator)
    sample.calibrate(pool, 0.05)
    both = defense.routers["both"]
    joint = both.estimate(detector, sample, pool, [50], 0.05, 400, torch.Generator().manual_seed(seed + 1))
    return {"features": features, "batch_scores": scores, "sample_scores": sample.scores(batches.flatten(0, 1)),
            "j": j_statistic(*detector.kernel.gram(clean, perturbed)),
            "thresholds": torch.stack([t for t, _, _ in thresholds.values()]),
            "sample_threshold": sample.threshold, "joint_thresholds": torch.stack(joint[50][:2])}


def compare(reference: dict[str, Tensor], other: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Per quantity: the largest difference relative to the reference's largest magnitude, and the verdict."""
    out = {}
    for name, ref in reference.items():
        ref, got = ref.double().cpu(), other[name].double().cpu()
        relative = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        out[name] = {"max_relative_difference": relative, "tolerance": TOLERANCES[name],
                     "within": relative <= TOLERANCES[name]}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="device_agreement")
    parser.add_argument("--results", default=RESULTS, type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    defense = _defense(generator)
    pool = torch.rand(400, 3, 32, 32, generator=generator)
    batches = torch.rand(4, 50, 3, 32, 32, generator=generator)
    on_cpu = statistics(defense, pool, batches, args.seed)
    device = torch.device(args.device)
    moved = copy.deepcopy(defense).to(device)
    moved.detector.refresh_reference_features()  # the stored sets' features, computed on the device
    moved.sample_detector.refresh()  # type: ignore[union-attr]
    on_device = statistics(moved, pool, batches, args.seed)
    quantities = compare(on_cpu, on_device)
    result = {"machine": machine_description(device), "quantities": quantities,
              "passed": all(q["within"] for q in quantities.values())}
    for name, q in quantities.items():
        print(f"{name}: {q['max_relative_difference']:.2e} (tolerance {q['tolerance']:.0e})"
              f"{'' if q['within'] else '  OUTSIDE'}")
    write_result(args.name, result, args.results)
    if not result["passed"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
