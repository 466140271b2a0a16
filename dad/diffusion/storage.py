"""Purifiers as plain data and files: the spec that rebuilds one, and its single-file save and load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dad.diffusion.purifiers import DiffusionPurifier, Purifier, SSNIPurifier
from dad.diffusion.schedule import DiffusionSchedule
from dad.diffusion.unet import ScoreUNet
from dad.io import IncompatibleFileError, atomic_torch_save, read_tagged

__all__ = ["purifier_spec", "build_purifier", "save_purifier", "load_purifier"]

_FORMAT = "dad-purifier"
_VERSION = 1


def purifier_spec(purifier: Purifier) -> dict[str, Any]:
    """A purifier as plain data (no weights): what :func:`build_purifier` needs to rebuild it.

    Keys: ``kind`` (``fixed`` or ``ssni``), the score network's and the schedule's configs, ``t_star``, ``sampler``,
    ``ddim_steps``, and for SSNI ``bias``, ``mapping``, ``slope``, ``eps_num_timesteps``, ``eps_max_timestep``.
    """
    base = purifier.purifier if isinstance(purifier, SSNIPurifier) else purifier
    if not isinstance(base.model, ScoreUNet):
        raise ValueError(f"Expected a purifier around a ScoreUNet to save, got {type(base.model).__name__}")
    spec: dict[str, Any] = {
        "kind": "ssni" if isinstance(purifier, SSNIPurifier) else "fixed",
        "score_net": dict(base.model.config),
        "schedule": dict(base.schedule.config),
        "t_star": base.t_star,
        "sampler": base.sampler,
        "ddim_steps": base.ddim_steps,
    }
    if isinstance(purifier, SSNIPurifier):
        spec.update(bias=purifier.bias, mapping=purifier.mapping, slope=purifier.slope,
                    eps_num_timesteps=purifier.eps_num_timesteps, eps_max_timestep=purifier.eps_max_timestep)
    return spec


def build_purifier(spec: dict[str, Any], checkpoint: bool = False) -> Purifier:
    """A purifier from :func:`purifier_spec` with an untrained network (load a state dict next).

    Raises ``KeyError``, ``TypeError`` or ``ValueError`` on a spec that does not describe a purifier.

    Args:
        spec: the plain-data description.
        checkpoint: gradient checkpointing of the reverse process (a memory setting, not part of the spec).
    """
    purifier: Purifier = DiffusionPurifier(ScoreUNet(**spec["score_net"]), DiffusionSchedule(**spec["schedule"]),
                                           spec["t_star"], spec["sampler"], spec["ddim_steps"], checkpoint)
    if spec["kind"] == "ssni":
        return SSNIPurifier(purifier, spec["bias"], spec["mapping"], spec["slope"], spec["eps_num_timesteps"],
                            spec["eps_max_timestep"])
    if spec["kind"] != "fixed":
        raise ValueError(f"unknown kind {spec['kind']!r}")
    return purifier


def save_purifier(purifier: Purifier, path: str | os.PathLike[str]) -> None:
    """Write a purifier to one file, atomically, as plain data and tensors (no pickled objects).

    The file holds a format tag and version, :func:`purifier_spec` and the state dict (weights, and ``mu``/``tau``).
    """
    payload: dict[str, Any] = {
        "format": _FORMAT,
        "version": _VERSION,
        **purifier_spec(purifier),
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
