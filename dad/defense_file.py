"""A saved defense read back: :func:`load_defense` rebuilds a :class:`~dad.defense.DADDefense` from its file.

Every format version written so far loads: 1 (specs without the kernel part), 2 (batch routing only), 3 (the
denoiser path only), 4 (a denoiser or a diffusion purifier, the joint thresholds under ``joint``), 5 (one
purifier of any kind, the routers' states under ``routers``) and 6 (a second classifier for flagged images,
optional); an older file is converted to the current layout
(:func:`upgrade`) before the networks are built. Anything else is a one-line
:class:`~dad.io.IncompatibleFileError` naming the file and its version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dad.defense import FORMAT, VERSION, DADDefense
from dad.detector import MMDDetector
from dad.diffusion import purifiers as _diffusion_kinds  # noqa: F401  (registers the diffusion purifiers)
from dad.io import IncompatibleFileError, read_tagged
from dad.networks import build_model, build_networks
from dad.purification import build_purifier
from dad.routing import ROUTERS, BothRouter
from dad.sample_detector import SampleDetector

__all__ = ["load_defense", "upgrade", "with_router_states", "READABLE"]

READABLE = (1, 2, 3, 4, 5, VERSION)


def upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """A defense payload of any readable version in the current layout (networks, purifier spec, state keys)."""
    if payload["version"] == VERSION:
        return payload
    state = dict(payload["state_dict"])
    networks = payload["networks"] if payload["version"] >= 2 else _networks_v1(payload)
    purifier = payload.get("purifier")
    if purifier is None:  # DAD's noise and denoiser, held apart from the purifier before version 5
        purifier = {"kind": "denoiser", "denoiser": networks["denoiser"], "noise_std": payload["noise_std"],
                    "noise": payload["noise"]}
        state = {(f"purifier.{k}" if k.startswith("denoiser.") else k): v for k, v in state.items()}
    if payload["version"] < 3:  # no joint thresholds before per-sample routing
        state |= {f"joint.{k}": v for k, v in BothRouter().state_dict().items()}
    state = {(k.replace("joint.", "routers.both.", 1) if k.startswith("joint.") else k): v for k, v in state.items()}
    networks = {"classifier": networks["classifier"], "kernel": networks["kernel"], "flagged_classifier": None}
    return {**payload, "version": VERSION, "networks": networks, "purifier": purifier, "state_dict": state}


def with_router_states(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with an uncalibrated state for every routing mode the file predates (a mode added since loads as
    not calibrated instead of failing the whole file)."""
    missing = {f"routers.{name}.{key}": value for name, router in ROUTERS.items()
               for key, value in router().state_dict().items() if f"routers.{name}.{key}" not in state}
    return {**state, **missing}


def _networks_v1(payload: dict[str, Any]) -> dict[str, Any]:
    specs = payload["specs"]
    phi = None if payload["shares_features"] else specs["feature_extractor"]
    return {"classifier": specs["classifier"], "denoiser": specs["denoiser"],
            "kernel": {"feature_extractor": phi, "train_features": payload["train_features"]}}


def load_defense(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                 checkpoint: bool = False) -> DADDefense:
    """Rebuild a :class:`DADDefense` from :meth:`DADDefense.save`'s file (any readable version), in eval mode.

    The file is read with ``weights_only=True``: only tensors and plain data are accepted, so a file
    from elsewhere can never run code. The networks are rebuilt by :func:`~dad.networks.build_networks`, the
    purifier by :func:`~dad.purification.build_purifier`.

    Args:
        path: the file.
        map_location: where the tensors are loaded.
        checkpoint: gradient checkpointing of a diffusion purifier's reverse process (a memory setting: full
            gradients through long reverse processes).
    """
    path = Path(path)
    missing = f"No saved defense at {path}: run `train.py pipeline` first (it writes defense.pt)"
    payload = read_tagged(path, FORMAT, READABLE, "DAD defense", missing, map_location)
    try:
        payload = upgrade(payload)
        state = with_router_states(payload["state_dict"])
        classifier, kernel, _ = build_networks(payload["networks"])
        flagged = payload["networks"]["flagged_classifier"]
        flagged = None if flagged is None else build_model(flagged)
        detector = MMDDetector(kernel, torch.zeros_like(state["detector.reference"]))
        sample_detector = None
        if payload.get("sample_score") is not None:
            sample_detector = SampleDetector(kernel, torch.zeros_like(state["sample_detector.clean"]),
                                             torch.zeros_like(state["sample_detector.adversarial"]),
                                             payload["sample_score"])
        defense = DADDefense(classifier, detector, build_purifier(payload["purifier"], checkpoint),
                             sample_detector=sample_detector, target_fpr=payload["target_fpr"],
                             flagged_classifier=flagged)
        defense.eval()  # before loading: the detectors refresh their stored sets' features through a trained phi,
        defense.load_state_dict(state)  # whose batch norm must use its running statistics, not the stored set's
    except (KeyError, TypeError, ValueError) as err:
        raise IncompatibleFileError(f"{path} does not describe a defense: {str(err).splitlines()[0]}") from None
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise IncompatibleFileError(f"{path} does not match its stored architecture: {first}") from None
    defense.routing = payload.get("routing", "batch")
    defense.route_selection = payload.get("route_selection")
    return defense.eval()
