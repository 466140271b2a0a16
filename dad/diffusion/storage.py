"""A purifier in one file: its spec (:meth:`~dad.purification.Purifier.spec`) and its weights, saved and loaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dad.diffusion import purifiers  # noqa: F401  (registers the diffusion kinds)
from dad.io import IncompatibleFileError, atomic_torch_save, read_tagged
from dad.purification import Purifier, build_purifier

__all__ = ["save_purifier", "load_purifier"]

_FORMAT = "dad-purifier"
_VERSION = 1


def save_purifier(purifier: Purifier, path: str | os.PathLike[str]) -> None:
    """Write a purifier to one file, atomically, as plain data and tensors (no pickled objects).

    The file holds a format tag and version, the purifier's spec and the state dict (weights, and ``mu``/``tau``).
    """
    payload: dict[str, Any] = {
        "format": _FORMAT,
        "version": _VERSION,
        **purifier.spec(),
        "state_dict": {k: v.detach().cpu() for k, v in purifier.state_dict().items()},
    }
    atomic_torch_save(payload, path)


def load_purifier(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                  checkpoint: bool = False) -> Purifier:
    """Rebuild a purifier from :func:`save_purifier`'s file, in eval mode.

    The file is read with ``weights_only=True``: only tensors and plain data are accepted, so a file from
    elsewhere can never run code. Anything else raises :class:`~dad.io.IncompatibleFileError`.

    Args:
        path: the file.
        map_location: where the tensors are loaded.
        checkpoint: the rebuilt purifier's gradient checkpointing (a memory setting, not saved).
    """
    path = Path(path)
    payload = read_tagged(path, _FORMAT, (_VERSION,), "purifier", f"No saved purifier at {path}", map_location)
    try:
        purifier = build_purifier(payload, checkpoint)
        purifier.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise IncompatibleFileError(f"{path} does not describe a purifier: {first}") from None
    return purifier.eval()
