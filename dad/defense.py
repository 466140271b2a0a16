"""DADDefense: the assembled defense as a plain ``nn.Module`` (no Lightning at inference).

Images in [0, 1] go in, logits come out. Each batch is scored by MMD-OPT against clean reference
data; a batch judged clean goes straight to the classifier, a batch judged adversarial is noised,
denoised and then classified. The batch score and decision are exposed for logging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dad.detector import MMDDetector
from dad.io import atomic_torch_save
from dad.networks import build_networks, logits_and_features, network_specs
from dad.noise import NOISE_MODES, NoiseMode, add_noise

__all__ = ["DADDefense", "DefenseOutput", "load_defense", "InvalidInputError", "IncompatibleFileError"]

_FORMAT = "dad-defense"
_VERSION = 2
_READABLE = (1, 2)  # version 1 stored the specs without the kernel part


class InvalidInputError(ValueError):
    """Raised for inputs the defense must not silently process (wrong shape, NaN/inf, outside [0, 1])."""


class IncompatibleFileError(ValueError):
    """Raised when a file is not a saved DAD defense or was saved by an incompatible version."""


@dataclass
class DefenseOutput:
    """What one forward pass of the defense produced."""

    logits: Tensor  # (B, K), or (draws, B, K) from DADDefense.forward_draws
    score: Tensor  # the batch's MMD^2 against the reference set, differentiable in the input
    adversarial: Tensor  # the routing decision: True if the batch went through the denoiser


def check_images(x: Tensor, shape: tuple[int, ...]) -> None:
    """Raise :class:`InvalidInputError` unless ``x`` is a finite batch of ``shape`` images in [0, 1]."""
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        expected = ", ".join(map(str, shape))
        raise InvalidInputError(f"Expected a batch of images of shape (B, {expected}), got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise InvalidInputError(f"DAD detects per batch: expected a batch of at least 2 images, got {x.shape[0]}")
    if not x.is_floating_point():
        raise InvalidInputError(f"Expected floating-point images in [0, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise InvalidInputError("Input contains NaN or inf values")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InvalidInputError(f"Expected pixel values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


def purify(denoiser: nn.Module, x: Tensor, noise_std: float, noise: NoiseMode) -> Tensor:
    """Noise, denoise and clamp to [0, 1]: the path of a batch judged adversarial (training validation too)."""
    return denoiser(add_noise(x, noise_std, noise)).clamp(0.0, 1.0)


class DADDefense(nn.Module):
    """Classifier + MMD-OPT detector + denoiser with per-batch routing.

    Args:
        classifier: maps images in [0, 1] to logits; if it is also the kernel's feature extractor,
            one forward pass yields both the logits and the detection features.
        detector: the calibrated MMD detector.
        denoiser: maps noisy images to denoised ones.
        noise_std, noise: the noise added before denoising (as in the denoiser's training).
    """

    def __init__(
        self,
        classifier: nn.Module,
        detector: MMDDetector,
        denoiser: nn.Module,
        noise_std: float = 0.25,
        noise: NoiseMode = "one_sided",
    ) -> None:
        super().__init__()
        if noise_std < 0:
            raise ValueError(f"Expected `noise_std` >= 0, got {noise_std}")
        if noise not in NOISE_MODES:
            raise ValueError(f"Unknown noise mode {noise!r}; expected one of {NOISE_MODES}")
        self.classifier = classifier
        self.detector = detector
        self.denoiser = denoiser
        self.noise_std = noise_std
        self.noise = noise

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.detector.reference.shape[1:])

    @property
    def shares_features(self) -> bool:
        """Whether the kernel's ``phi`` is the classifier itself (one forward pass serves both)."""
        return self.detector.kernel.phi is self.classifier

    @property
    def specs(self) -> dict[str, Any]:
        """The networks as plain data (:func:`~dad.networks.network_specs`)."""
        return network_specs(self.classifier, self.detector.kernel, self.denoiser)

    def purify(self, x: Tensor) -> Tensor:
        """Noise then denoise, clamped to the valid image range."""
        return purify(self.denoiser, x, self.noise_std, self.noise)

    def classify_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of the classifier and the detector's features of ``x`` (one pass when phi is the classifier)."""
        return logits_and_features(self.classifier, self.detector.kernel, x)

    def forward_with_info(self, x: Tensor) -> DefenseOutput:
        """Route the batch and return logits, the batch's MMD score and the decision."""
        out = self.forward_draws(x, 1)
        return DefenseOutput(logits=out.logits[0], score=out.score, adversarial=out.adversarial)

    def forward_draws(self, x: Tensor, draws: int) -> DefenseOutput:
        """``draws`` independent passes of the defense on the batch ``x``: logits of shape ``(draws, B, K)``.

        The detection (score and decision) does not depend on the noise, so it is computed once, and a batch
        judged clean is deterministic: only the denoiser path is drawn ``draws`` times. The random state is
        consumed exactly as ``draws`` calls of :meth:`forward_with_info` would.
        """
        check_images(x, self.image_shape)
        if draws < 1:
            raise ValueError(f"Expected `draws` >= 1, got {draws}")
        x = x.to(self.detector.reference.dtype)  # float16/float64 callers get the model's precision
        logits, features = self.classify_with_features(x)
        score = self.detector.score(x, features)
        adversarial = self.detector.decide(score, x.shape[0])
        if bool(adversarial):
            stacked = torch.stack([self.classifier(self.purify(x)) for _ in range(draws)])
        else:
            stacked = logits.expand(draws, *logits.shape)
        return DefenseOutput(logits=stacked, score=score, adversarial=adversarial)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_info(x).logits

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the defense to one file, atomically (temporary file, then rename)."""
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "networks": self.specs,
            "noise_std": self.noise_std,
            "noise": self.noise,
            "target_fpr": self.detector.target_fpr,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        atomic_torch_save(payload, path)


def load_defense(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> DADDefense:
    """Rebuild a :class:`DADDefense` from :meth:`DADDefense.save`'s file.

    The file is read with ``weights_only=True``: only tensors and plain data are accepted, so a file
    from elsewhere can never run code. The networks are rebuilt by :func:`~dad.networks.build_networks`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No saved defense at {path}: run `train.py pipeline` first (it writes defense.pt)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle errors differ by cause; all mean "not a loadable defense"
        raise IncompatibleFileError(f"{path} is not a loadable DAD defense: {str(err).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise IncompatibleFileError(f"{path} is not a saved DAD defense (no '{_FORMAT}' header)")
    if payload.get("version") not in _READABLE:
        raise IncompatibleFileError(f"{path} has format version {payload.get('version')}, this code reads {_READABLE}")
    state = payload["state_dict"]
    classifier, kernel, denoiser = build_networks(_networks_of(payload))
    detector = MMDDetector(kernel, torch.zeros_like(state["detector.reference"]), target_fpr=payload["target_fpr"])
    defense = DADDefense(classifier, detector, denoiser, payload["noise_std"], payload["noise"])
    try:
        defense.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise IncompatibleFileError(f"{path} does not match its stored architecture: {first}") from None
    return defense.eval()


def _networks_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The network specs of a saved defense, from either file version."""
    if payload["version"] >= 2:
        return payload["networks"]
    specs = payload["specs"]
    phi = None if payload["shares_features"] else specs["feature_extractor"]
    return {"classifier": specs["classifier"], "denoiser": specs["denoiser"],
            "kernel": {"feature_extractor": phi, "train_features": payload["train_features"]}}
