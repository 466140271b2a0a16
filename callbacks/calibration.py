"""Calibrate the defense's thresholds on clean held-out data at a target false-positive rate."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from dad.detector import check_fpr

__all__ = ["ThresholdCalibration"]

log = logging.getLogger(__name__)


class ThresholdCalibration(Callback):
    """Calibrates the defense (:meth:`~dad.defense.DADDefense.calibrate`) when a
    :class:`~lightning_modules.evaluator.DefenseEvaluator`'s validation starts: after the Trainer has moved the
    defense, so the scores are computed on the run's device.

    Every detecting mode is calibrated on random clean batches of each size drawn from ``clean`` (the calibration
    split, or the validation split where none is carved: never the reference set, never the test set), whatever
    routing the defense uses now (it stays settable); the thresholds are stored in the defense (so they are saved
    with it) and the FPR on the pool's own draws is logged. The results are part of the callback state, so they
    are restored with a checkpoint.

    Args:
        clean: the clean held-out images.
        batch_sizes: batch sizes to calibrate (the inference batch size and any evaluated sizes).
        target_fpr: the false-positive rate to calibrate for, in (0, 1).
        num_batches: random batches per size (the 95% quantile needs hundreds, not a handful).
        seed: seed of the random draws.
    """

    def __init__(self, clean: Tensor, batch_sizes: Sequence[int], target_fpr: float, num_batches: int = 1000,
                 seed: int = 0) -> None:
        check_fpr(target_fpr)
        self.clean = clean
        self.batch_sizes = [b for b in batch_sizes if 2 <= b < len(clean)]
        if not self.batch_sizes:
            raise ValueError(f"No batch size in {list(batch_sizes)} fits a clean pool of {len(clean)} images")
        self.target_fpr = target_fpr
        self.num_batches = num_batches
        self.seed = seed
        self.results: dict[str, Any] = {}

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        defense = pl_module.defense
        clean = self.clean.to(defense.detector.reference.device)
        self.results = defense.calibrate(clean, self.batch_sizes, self.target_fpr, self.num_batches, self.seed)
        for size, res in self.results.get("batch", {}).items():
            log.info("batch size %d: threshold %.4g (target FPR %.3f; %.3f on the pool's own %d draws)",
                     size, res["threshold"], self.target_fpr, res["fpr_pool"], res["num_batches"])
        if "sample" in self.results:
            res = self.results["sample"]
            log.info("per sample: threshold %.4g (95%% interval %.4g to %.4g, %d clean images)",
                     res["threshold"], res["threshold_low"], res["threshold_high"], res["num_images"])
        if trainer.logger is not None:
            batch = self.results.get("batch", {})
            trainer.logger.log_metrics({f"calibration/fpr_pool_b{size}": res["fpr_pool"] for size, res in batch.items()}
                                       | {f"calibration/threshold_b{size}": res["threshold"]
                                          for size, res in batch.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results, "target_fpr": self.target_fpr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        results = state_dict["results"]
        if "sample_results" in state_dict:  # before the defense owned its calibration: the batch mode's alone
            results = {"batch": results, "sample": state_dict["sample_results"], "both": state_dict["joint_results"]}
        self.results = results
        self.target_fpr = state_dict["target_fpr"]
