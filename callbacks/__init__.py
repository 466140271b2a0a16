"""Lightning callbacks: threshold calibration and TensorBoard visualisations."""

from callbacks.calibration import ThresholdCalibration
from callbacks.tensorboard import DenoiserImageLogger, DetectionHistogramLogger

__all__ = ["ThresholdCalibration", "DenoiserImageLogger", "DetectionHistogramLogger"]
