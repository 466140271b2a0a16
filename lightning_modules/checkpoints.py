"""Reading stage checkpoints safely and rebuilding the networks they hold.

Every stage writes Lightning checkpoints tagged with its stage name. They are read here with
``torch.load(..., weights_only=True)`` (a checkpoint from elsewhere can never run code), checked for
the expected stage, and the networks are rebuilt from the plain-data hyper-parameters they carry.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from torch import Tensor, nn

from dad.io import atomic_torch_save
from dad.kernels import SemanticKernel
from dad.models import ImageClassifier, create_model

__all__ = [
    "StageCheckpointError", "AtomicCheckpointIO", "read_checkpoint", "sub_state_dict", "build_classifier", "build_kernel",
]

STAGE_KEY = "dad_stage"


class StageCheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another stage, or of mismatching shapes."""


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
    """Load a Lightning checkpoint of ``stage`` with ``weights_only=True`` and check its stage tag.

    Args:
        path: the checkpoint file.
        stage: the stage that must have written it (``classifier``, ``kernel``, ``denoiser``).
        hint: the command that makes the missing checkpoint, for the error message.
    """
    path = Path(path)
    if not path.is_file():
        raise StageCheckpointError(f"No {stage} checkpoint at {path}" + (f": run `{hint}` first" if hint else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageCheckpointError(f"Cannot read {path} as a checkpoint ({first})") from None
    found = ckpt.get(STAGE_KEY) if isinstance(ckpt, dict) else None
    if found != stage:
        raise StageCheckpointError(f"{path} is a {found or 'foreign'} checkpoint, expected a {stage} checkpoint")
    return ckpt


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


def build_classifier(ckpt_path: str | Path, hint: str = "") -> tuple[ImageClassifier, dict[str, Any]]:
    """The trained classifier of a classifier-stage checkpoint, and its model spec."""
    ckpt = read_checkpoint(ckpt_path, "classifier", hint)
    hp = ckpt["hyper_parameters"]
    spec = {"name": hp["model"], "kwargs": {"num_classes": hp["num_classes"], **(hp.get("model_kwargs") or {})}}
    model = create_model(spec["name"], **spec["kwargs"])
    load_into(model, sub_state_dict(ckpt["state_dict"], "model"), ckpt_path)
    return model, spec


def build_kernel(ckpt_path: str | Path, classifier: ImageClassifier, hint: str = "") -> tuple[SemanticKernel, dict]:
    """The trained MMD-OPT kernel of a kernel-stage checkpoint.

    If the kernel was trained on the classifier's own features, ``classifier`` becomes its ``phi``
    (shared, not copied); otherwise its feature extractor is rebuilt from the stored spec.

    Returns:
        The kernel and the feature-extractor spec (None when it is the classifier).
    """
    ckpt = read_checkpoint(ckpt_path, "kernel", hint)
    hp = ckpt["hyper_parameters"]
    spec = None
    if hp.get("feature_extractor"):
        spec = {"name": hp["feature_extractor"], "kwargs": dict(hp.get("feature_extractor_kwargs") or {})}
        phi: nn.Module = create_model(spec["name"], **spec["kwargs"])
    else:
        phi = classifier
    kernel = SemanticKernel(phi, train_features=hp.get("train_features", False))
    load_into(kernel, sub_state_dict(ckpt["state_dict"], "kernel"), ckpt_path)
    return kernel, spec
