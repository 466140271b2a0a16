"""``standard``: cross-entropy on the clean batch (the classifier stage's own step, with its label smoothing)."""

from __future__ import annotations

from dad.training.base import TrainingMethod

__all__ = ["Standard"]


class Standard(TrainingMethod):
    """No inner maximisation: the stage trains on the clean images."""

    name = "standard"
    adversarial = False
