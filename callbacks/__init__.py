"""Lightning callbacks: threshold calibration, resumable state, progress and TensorBoard visualisations."""

from callbacks.attack_state import AttackStateWriter
from callbacks.averaging import DelayedEMA
from callbacks.calibration import ThresholdCalibration
from callbacks.progress import ProgressLog
from callbacks.resume import ResumeState
from callbacks.tensorboard import DenoiserImageLogger, DetectionHistogramLogger, log_figures

__all__ = [
    "AttackStateWriter", "DelayedEMA", "DenoiserImageLogger", "DetectionHistogramLogger", "ProgressLog", "ResumeState",
    "ThresholdCalibration", "log_figures",
]
