"""The networks of a DAD run described as plain data, and the one function that builds them from it.

Stage checkpoints and saved defenses store :func:`network_specs` (names and constructor options, never
pickled objects); :func:`build_networks` rebuilds the classifier, the MMD-OPT kernel and the denoiser
from it, so the pipeline and :func:`~dad.defense.load_defense` build networks the same way. A kernel
whose ``phi`` is the classifier shares it (one forward pass gives logits and features) instead of
holding a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from dad.denoisers import UNetDenoiser
from dad.kernels import SemanticKernel
from dad.models import ImageClassifier, create_model

__all__ = ["model_spec", "network_specs", "build_model", "build_networks", "logits_and_features"]


def model_spec(model: nn.Module) -> dict[str, Any]:
    """``{"name", "kwargs"}`` of a factory model (see :func:`dad.models.create_model`)."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, Mapping):
        raise ValueError(f"{type(model).__name__} was not built by dad.models.create_model: it has no spec to save")
    return {"name": spec["name"], "kwargs": dict(spec["kwargs"])}


def network_specs(classifier: nn.Module, kernel: SemanticKernel | None = None,
                  denoiser: UNetDenoiser | None = None) -> dict[str, Any]:
    """Plain-data description of the networks: what :func:`build_networks` needs to rebuild them.

    Keys: ``classifier`` (a model spec), ``kernel`` (None, or ``{"feature_extractor": model spec or None
    when phi is the classifier, "train_features": bool}``) and ``denoiser`` (None, or its constructor options).
    """
    kernel_part = None
    if kernel is not None:
        shared = kernel.phi is classifier
        kernel_part = {"feature_extractor": None if shared else model_spec(kernel.phi),
                       "train_features": kernel.train_features}
    return {"classifier": model_spec(classifier), "kernel": kernel_part,
            "denoiser": dict(denoiser.config) if denoiser is not None else None}


def build_model(spec: Mapping[str, Any]) -> ImageClassifier:
    """A factory model from its spec (initial weights)."""
    return create_model(spec["name"], **dict(spec.get("kwargs") or {}))


def build_networks(specs: Mapping[str, Any]) -> tuple[ImageClassifier, SemanticKernel | None, UNetDenoiser | None]:
    """``(classifier, kernel, denoiser)`` from :func:`network_specs`, with initial weights (load a state dict next)."""
    classifier = build_model(specs["classifier"])
    kernel = None
    if specs.get("kernel") is not None:
        phi_spec = specs["kernel"]["feature_extractor"]
        phi = classifier if phi_spec is None else build_model(phi_spec)
        kernel = SemanticKernel(phi, train_features=bool(specs["kernel"]["train_features"]))
    denoiser = UNetDenoiser(**specs["denoiser"]) if specs.get("denoiser") is not None else None
    return classifier, kernel, denoiser


def logits_and_features(classifier: nn.Module, kernel: SemanticKernel, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of ``classifier`` and the kernel's features of ``x``: one forward pass when phi is the classifier."""
    if kernel.phi is classifier:
        return classifier.forward_with_features(x)
    return classifier(x), kernel.features(x)
