"""One LightningModule per stage: classifier, kernel (MMD-OPT), denoiser, and the defense's evaluator."""

from lightning_modules.classifier import ClassifierModule, ClassifierSettings
from lightning_modules.denoiser import DenoiserModule, DenoiserSettings
from lightning_modules.evaluator import DefenseEvaluator
from lightning_modules.kernel import KernelModule, KernelSettings

__all__ = ["ClassifierModule", "ClassifierSettings", "DefenseEvaluator", "DenoiserModule", "DenoiserSettings",
           "KernelModule", "KernelSettings"]
