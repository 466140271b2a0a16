"""Reading stage checkpoints safely, and rebuilding the networks they hold.

Every stage writes Lightning checkpoints tagged with its stage name, the checkpoint format and the specs
of its networks (:class:`~lightning_modules.stage.StageModule`). They are read here with
``torch.load(..., weights_only=True)`` (a checkpoint from elsewhere can never run code), checked for the
expected stage and format, and their networks rebuilt by :func:`dad.networks.build_networks`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from torch import Tensor, nn

from dad.io import atomic_torch_save
from lightning_modules.stage import CHECKPOINT_FORMAT, FORMAT_KEY, NETWORKS_KEY, STAGE_KEY

__all__ = ["StageCheckpointError", "AtomicCheckpointIO", "read_checkpoint", "sub_state_dict", "load_into",
           "checkpoint_networks"]


class StageCheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another stage or format, or of mismatching shapes."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes a temporary file and renames it (a crash mid-write never
    leaves a truncated ``last.ckpt`` behind) and reads only with ``weights_only=True`` (a resumed
    checkpoint can never run code)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StageCheckpointError(f"Refusing to load {path}: not a plain checkpoint ({first})") from None


def read_checkpoint(path: str | Path, stage: str, hint: str = "") -> dict[str, Any]:
    """Load a Lightning checkpoint of ``stage`` with ``weights_only=True`` and check its stage tag and format.

    Args:
        path: the checkpoint file.
        stage: the stage that must have written it (``classifier``, ``kernel``, ``denoiser``).
        hint: the command that (re)makes the checkpoint, for the error message.
    """
    path = Path(path)
    again = f": run `{hint}`" if hint else ""
    if not path.is_file():
        raise StageCheckpointError(f"No {stage} checkpoint at {path}" + (f"{again} first" if hint else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageCheckpointError(f"Cannot read {path} as a checkpoint ({first})") from None
    found = ckpt.get(STAGE_KEY) if isinstance(ckpt, dict) else None
    if found != stage:
        raise StageCheckpointError(f"{path} is a {found or 'foreign'} checkpoint, expected a {stage} checkpoint")
    if ckpt.get(FORMAT_KEY) != CHECKPOINT_FORMAT:
        raise StageCheckpointError(f"{path} was written by an earlier version of dad (checkpoint format "
                                   f"{ckpt.get(FORMAT_KEY, 1)}, this one reads {CHECKPOINT_FORMAT}){again} again "
                                   "to rewrite it, or train into a new --run.name")
    return ckpt


def checkpoint_networks(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The network specs a stage checkpoint carries (see :func:`dad.networks.network_specs`)."""
    return ckpt[NETWORKS_KEY]


def sub_state_dict(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix.``, with the prefix removed."""
    head = prefix + "."
    return {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}


def load_into(module: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """``load_state_dict`` with a one-line :class:`StageCheckpointError` on mismatching keys or shapes."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise StageCheckpointError(f"{source} does not fit the configured architecture: {detail[:300]}") from None
