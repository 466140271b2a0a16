"""Lightning callbacks: threshold calibration, route selection, resumable state, progress and TensorBoard
visualisations."""

from callbacks.attack_state import AttackStateWriter
from callbacks.averaging import BatchNormRefresh, DelayedEMA
from callbacks.calibration import ThresholdCalibration
from callbacks.device_data import BatchesOnDevice
from callbacks.memory_format import ChannelsLast
from callbacks.progress import ProgressLog, StepProgressBar
from callbacks.resume import ResumeState
from callbacks.route_selection import RouteSelection
from callbacks.tensorboard import DenoiserImageLogger, DetectionHistogramLogger, log_figures

__all__ = [
    "AttackStateWriter", "BatchesOnDevice", "BatchNormRefresh", "ChannelsLast", "DelayedEMA", "DenoiserImageLogger",
    "DetectionHistogramLogger", "ProgressLog", "ResumeState", "RouteSelection", "StepProgressBar",
    "ThresholdCalibration", "log_figures",
]
