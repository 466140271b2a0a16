"""What every training method of the classifier is: a :class:`TrainingMethod` turns a batch into the loss to descend.

A standard method is cross-entropy on the clean batch (the classifier stage's own step, with its label smoothing).
An adversarial method first runs an inner maximisation (:mod:`dad.training.inner`: eval-mode batch norm, input
gradients only) with the training attack (:class:`TrainingAttack`), then computes its outer loss; it reports the
backward passes each sample cost and, where its path counts them, GAIRAT's kappa. A method's own options are a
frozen dataclass (:attr:`TrainingMethod.Options`), set in the configuration as ``classifier.method``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple

from torch import Tensor
from torch.nn import functional as F

from dad.attacks.common import Model
from dad.training.inner import InnerMaximum

__all__ = ["TrainingMethod", "TrainingAttack", "MethodStep", "NoOptions", "check_non_negative"]


@dataclass(frozen=True)
class TrainingAttack:
    """The Linf attack of adversarial training: radius, step size and steps K (10 in every paper of the line)."""

    eps: float
    step_size: float
    steps: int


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


class MethodStep(NamedTuple):
    """One adversarial training step: the loss, the logits the accuracy is measured on, the inner steps taken per
    sample and kappa (None where the path has no labels)."""

    loss: Tensor
    logits: Tensor
    steps: Tensor
    kappa: Tensor | None


def check_non_negative(name: str, value: float) -> None:
    """A one-line ValueError naming the option unless ``value >= 0``."""
    if not value >= 0:
        raise ValueError(f"Expected `classifier.method.{name}` >= 0, got {value}")


class TrainingMethod:
    """A training method (subclasses: one per method, in :data:`dad.training.TRAINING_METHODS`).

    Args:
        attack: the training attack (adversarial methods).
        options: the method's own options, an instance of :attr:`Options`.
    """

    name: ClassVar[str]
    adversarial: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions

    def __init__(self, attack: TrainingAttack, options: Any = None) -> None:
        self.attack = attack
        self.options = options if options is not None else self.Options()

    @classmethod
    def options_from(cls, values: dict[str, Any]) -> Any:
        """The method's options from ``classifier.method`` (a mapping); unknown keys are a one-line error."""
        known = {f.name for f in fields(cls.Options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown `classifier.method` option(s) {unknown} for training {cls.name!r}; "
                             f"expected some of {sorted(known)}")
        return cls.Options(**values)

    def inner(self, model: Model, x: Tensor, y: Tensor, progress: float) -> InnerMaximum:
        """The inner maximisation at ``progress`` (the share of the training epochs done)."""
        raise NotImplementedError

    def outer(self, model: Model, x: Tensor, y: Tensor, logits: Tensor, inner: InnerMaximum,
              progress: float) -> Tensor:
        """The outer loss from the examples' ``logits`` (cross-entropy unless the method says otherwise)."""
        return F.cross_entropy(logits, y)

    def step(self, model: Model, x: Tensor, y: Tensor, progress: float) -> MethodStep:
        """The inner maximisation, the examples' logits (model in the caller's mode), then the outer loss."""
        inner = self.inner(model, x, y, progress)
        logits = model(inner.examples)
        return MethodStep(self.outer(model, x, y, logits, inner, progress), logits, inner.steps, inner.kappa)
