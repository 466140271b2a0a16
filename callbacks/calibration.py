"""Calibrate the defense's thresholds on clean held-out data at a target false-positive rate."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

__all__ = ["ThresholdCalibration"]

log = logging.getLogger(__name__)


class ThresholdCalibration(Callback):
    """Sets the detector's thresholds when a :class:`~lightning_modules.evaluator.DefenseEvaluator`'s validation
    starts: after the Trainer has moved the defense, so the scores are computed on the run's device.

    Scores ``num_batches`` random clean batches of each size drawn from ``clean`` (the calibration split,
    or the validation split where none is carved: never the reference set, never the test set), puts each
    threshold at the ``1 - target_fpr`` quantile widened for the pool's finite size (see
    :meth:`~dad.detector.MMDDetector.calibrate`), stores it in the defense (so it is saved with it) and
    logs the FPR measured on the draws. A defense with a per-sample detector also gets its per-sample
    threshold (the quantile of the clean images' scores) and the joint thresholds of the ``both`` routing
    (:class:`~dad.routing.JointThresholds`), whatever routing it uses now: the routing stays settable.
    Its results are part of the callback state, so they are restored with a checkpoint.

    Args:
        clean: the clean held-out images.
        batch_sizes: batch sizes to calibrate (the inference batch size and any evaluated sizes).
        target_fpr: the false-positive rate to calibrate for, in (0, 1).
        num_batches: random batches per size (the 95% quantile needs hundreds, not a handful).
        seed: seed of the random draws.
    """

    def __init__(self, clean: Tensor, batch_sizes: Sequence[int], target_fpr: float = 0.05,
                 num_batches: int = 1000, seed: int = 0) -> None:
        if not 0.0 < target_fpr < 1.0:
            raise ValueError(f"Expected `target_fpr` in (0, 1), got {target_fpr}")
        self.clean = clean
        self.batch_sizes = [b for b in batch_sizes if 2 <= b < len(clean)]
        if not self.batch_sizes:
            raise ValueError(f"No batch size in {list(batch_sizes)} fits a clean pool of {len(clean)} images")
        self.target_fpr = target_fpr
        self.num_batches = num_batches
        self.seed = seed
        self.results: dict[int, dict[str, float]] = {}
        self.sample_results: dict[str, float] = {}
        self.joint_results: dict[int, dict[str, float]] = {}

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        defense = pl_module.defense
        detector = defense.detector
        clean = self.clean.to(detector.reference.device)
        generator = torch.Generator().manual_seed(self.seed)
        self.results = detector.calibrate(clean, self.batch_sizes, self.num_batches, self.target_fpr, generator)
        for size, res in self.results.items():
            log.info("batch size %d: threshold %.4g (target FPR %.3f; %.3f on the pool's own %d draws)",
                     size, res["threshold"], self.target_fpr, res["fpr_pool"], res["num_batches"])
        if defense.sample_detector is not None:
            self.sample_results = defense.sample_detector.calibrate(clean, self.target_fpr)
            log.info("per sample: threshold %.4g (95%% interval %.4g to %.4g, %d clean images)",
                     self.sample_results["threshold"], self.sample_results["threshold_low"],
                     self.sample_results["threshold_high"], self.sample_results["num_images"])
            generator = torch.Generator().manual_seed(self.seed + 1)
            self.joint_results = defense.joint.calibrate(detector, defense.sample_detector, clean, self.batch_sizes,
                                                         self.target_fpr, self.num_batches, generator)
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"calibration/fpr_pool_b{size}": res["fpr_pool"] for size, res in self.results.items()}
                | {f"calibration/threshold_b{size}": res["threshold"] for size, res in self.results.items()}
            )

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "sample_results": self.sample_results, "joint_results": self.joint_results,
                "target_fpr": self.target_fpr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = state_dict["results"]
        self.sample_results = state_dict.get("sample_results", {})
        self.joint_results = state_dict.get("joint_results", {})
        self.target_fpr = state_dict["target_fpr"]
