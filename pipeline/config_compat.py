"""Configurations of earlier versions: options that moved, and where to (a one-line error names the new key; a
saved run's ``config.yaml`` has its moved options moved when ``eval.py`` reads it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from dad.training import TRAINING_METHODS

__all__ = ["MOVED_OPTIONS", "moved_option_hint", "move_options"]


MOVED_OPTIONS: dict[str, str] = {
    "classifier.trades_beta": "classifier.method.beta",
    "classifier.fat_omega": "classifier.method.omega",
    "classifier.gairat_lambda": "classifier.method.lam",
}
"""Options of earlier versions and where they live now (a training method's own options moved under ``method``)."""


def moved_option_hint(message: str) -> str:
    """``message`` (an error about an unknown option) with the option's new name where it moved."""
    for old, new in MOVED_OPTIONS.items():
        if old in message or f"'{old.split('.')[1]}'" in message:
            return f"{message} (`{old}` moved to `{new}`)"
    return message


def move_options(data: Mapping[str, Any]) -> dict[str, Any]:
    """An earlier version's configuration with its moved options in their new places, where the run's training
    method has them (a method without such an option never read it: it is dropped as unknown)."""
    moved = {section: dict(value) if isinstance(value, Mapping) else value for section, value in data.items()}
    classifier = moved.get("classifier")
    if not isinstance(classifier, dict):
        return moved
    method = TRAINING_METHODS.get(classifier.get("training", "standard"))
    accepted = {f.name for f in fields(method.Options)} if method is not None else set()
    options = dict(classifier.get("method") or {})
    for old, new in MOVED_OPTIONS.items():
        name, option = old.split(".")[1], new.split(".")[2]
        if name in classifier and option in accepted:
            options.setdefault(option, classifier.pop(name))
    if options:
        classifier["method"] = options
    return moved
