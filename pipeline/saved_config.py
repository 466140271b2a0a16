"""A run's saved ``config.yaml``, read by ``eval.py --run`` and the benchmarks whichever version wrote it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PipelineConfig, known_options, parse_config
from pipeline.config_compat import move_options

__all__ = ["prune_config", "saved_config_text", "load_saved_config"]

log = logging.getLogger(__name__)


def prune_config(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A saved configuration of an earlier version: its moved options moved, the options this version no longer
    has dropped (their dotted names returned, to report); the sections must still parse."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for section, value in move_options(data).items():
        try:
            known = known_options(section)
        except KeyError:
            dropped.append(section)
            continue
        if known is None or not isinstance(value, Mapping):
            kept[section] = value
            continue
        kept[section] = {k: v for k, v in value.items() if k in known}
        dropped += [f"{section}.{k}" for k in value if k not in known]
    return kept, dropped


def saved_config_text(path: Path) -> str:
    """The YAML of the run configuration at ``path`` in this version's terms: an earlier version's moved options
    moved, the options this version no longer has dropped with a warning naming them (:func:`prune_config`)."""
    data, dropped = prune_config(yaml.safe_load(path.read_text()) or {})
    if dropped:
        log.warning("%s was written by an earlier version: ignoring %s", path, ", ".join(dropped))
    return yaml.safe_dump(data, sort_keys=False)


def load_saved_config(path: Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """The run configuration at ``path`` (:func:`saved_config_text`) with ``--<section>.<option> VALUE``
    ``overrides`` on top, parsed as ``train.py`` parses its command line."""
    return parse_config(["--config", saved_config_text(path), *overrides])
