"""DADDefense: the assembled defense as a plain ``nn.Module`` (no Lightning at inference).

Images in [0, 1] go in, logits come out. MMD-OPT judges the input against clean reference data, per
batch or per image (:mod:`dad.routing`); what is judged clean goes straight to the classifier, what is
judged adversarial is purified and then classified. The purification path is DAD's (noise, then the
denoiser) or a diffusion purifier (:mod:`dad.diffusion`: fixed-t DiffPure-style or SSNI), so the same
harness runs the classifier alone (routing ``never``), a purifier alone (``always``) and DAD with either
path. The scores and decisions are exposed for logging and for attacks that know them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dad.detector import MMDDetector
from dad.diffusion import Purifier, build_purifier, purifier_spec
from dad.io import IncompatibleFileError, atomic_torch_save, read_tagged
from dad.networks import build_networks, logits_and_features, network_specs
from dad.noise import NOISE_MODES, NoiseMode, add_noise
from dad.routing import ROUTINGS, JointThresholds, Routing, relative_excess
from dad.sample_detector import SampleDetector

__all__ = ["DADDefense", "DefenseOutput", "Detection", "PurifiedRoute", "load_defense", "InvalidInputError",
           "IncompatibleFileError"]

_FORMAT = "dad-defense"
_VERSION = 4
_READABLE = (1, 2, 3, 4)  # 1: specs without the kernel part; 2: batch routing only; 3: no diffusion purifier


class InvalidInputError(ValueError):
    """Raised for inputs the defense must not silently process (wrong shape, NaN/inf, outside [0, 1])."""


@dataclass
class Detection:
    """What the detectors say of a batch, differentiable in its images.

    Attributes:
        score: the statistic the routing reports: the batch's MMD^2 against the reference set (``batch``,
            ``both``), the mean per-sample score (``sample``), 0 under the fixed routings.
        batch_excess: ``(score - threshold) / |threshold|`` of the batch test (None in ``sample`` routing; a
            constant -1 or +1 without gradient under ``never`` / ``always``, so objectives see a fixed route).
        sample_excess: the same per image for the per-sample test, shape ``(B,)`` (None in ``batch`` routing).
        flags: the routing decision per image, shape ``(B,)``: True where the image is purified.
    """

    score: Tensor
    batch_excess: Tensor | None
    sample_excess: Tensor | None
    flags: Tensor


@dataclass
class DefenseOutput:
    """What one forward pass of the defense produced."""

    logits: Tensor  # (B, K), or (draws, B, K) from DADDefense.forward_draws
    score: Tensor  # the routing's detection statistic (see Detection), differentiable in the input
    adversarial: Tensor  # True if any image of the batch was purified
    flags: Tensor | None = None  # (B,): which images were purified


def check_images(x: Tensor, shape: tuple[int, ...], min_batch: int = 2) -> None:
    """Raise :class:`InvalidInputError` unless ``x`` is a finite batch of ``shape`` images in [0, 1]."""
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        expected = ", ".join(map(str, shape))
        raise InvalidInputError(f"Expected a batch of images of shape (B, {expected}), got {tuple(x.shape)}")
    if x.shape[0] < min_batch:
        raise InvalidInputError(f"DAD detects per batch: expected a batch of at least {min_batch} images, got "
                                f"{x.shape[0]} (`routing: sample` judges single images)")
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


class PurifiedRoute(nn.Module):
    """The route of a flagged batch as one network: noise, denoise, clamp, classify (logits out).

    What an attacker who gets the batch flagged attacks, and what adversarial training of the denoiser
    (``denoiser.adv_steps``) attacks during training.
    """

    def __init__(self, denoiser: nn.Module, classifier: nn.Module, noise_std: float, noise: NoiseMode) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier
        self.noise_std = noise_std
        self.noise = noise

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(purify(self.denoiser, x, self.noise_std, self.noise))


class DADDefense(nn.Module):
    """Classifier + MMD-OPT detectors + purification, routing per batch, per image or both (:mod:`dad.routing`).

    Args:
        classifier: maps images in [0, 1] to logits; if it is also the kernel's feature extractor,
            one forward pass yields both the logits and the detection features.
        detector: the calibrated batch MMD detector.
        denoiser: maps noisy images to denoised ones (None when ``purifier`` is given).
        noise_std, noise: the noise added before denoising (as in the denoiser's training).
        sample_detector: the per-sample detector (needed by the ``sample`` and ``both`` routings).
        routing: ``batch`` (the paper's), ``sample`` or ``both``, or the baselines ``never`` (the classifier
            alone) and ``always`` (every image purified); settable on a built or loaded defense.
        purifier: a diffusion purifier (:class:`~dad.diffusion.DiffusionPurifier` or
            :class:`~dad.diffusion.SSNIPurifier`) that replaces noise + denoiser as the purification path.
    """

    def __init__(
        self,
        classifier: nn.Module,
        detector: MMDDetector,
        denoiser: nn.Module | None,
        noise_std: float = 0.25,
        noise: NoiseMode = "one_sided",
        sample_detector: SampleDetector | None = None,
        routing: Routing = "batch",
        purifier: Purifier | None = None,
    ) -> None:
        super().__init__()
        if (denoiser is None) == (purifier is None):
            raise ValueError("Expected exactly one purification path: a `denoiser` or a diffusion `purifier`")
        if noise_std < 0:
            raise ValueError(f"Expected `noise_std` >= 0, got {noise_std}")
        if noise not in NOISE_MODES:
            raise ValueError(f"Unknown noise mode {noise!r}; expected one of {NOISE_MODES}")
        self.classifier = classifier
        self.detector = detector
        self.denoiser = denoiser
        self.noise_std = noise_std
        self.noise = noise
        self.sample_detector = sample_detector
        self.purifier = purifier
        self.joint = JointThresholds()
        self.routing = routing

    @property
    def routing(self) -> Routing:
        """How images are routed: ``batch``, ``sample``, ``both``, ``never`` or ``always`` (see :mod:`dad.routing`)."""
        return self._routing

    @routing.setter
    def routing(self, mode: Routing) -> None:
        if mode not in ROUTINGS:
            raise ValueError(f"Expected `routing` in {ROUTINGS}, got {mode!r}")
        if mode in ("sample", "both") and self.sample_detector is None:
            raise ValueError(f"`routing: {mode}` needs a per-sample detector; this defense has none (it was saved "
                             "before per-sample routing existed: re-run `train.py defense`)")
        self._routing = mode

    def with_purifier(self, purifier: Purifier, routing: Routing | None = None) -> DADDefense:
        """This defense with ``purifier`` as its purification path, sharing the classifier, detectors and thresholds.

        Args:
            purifier: the diffusion purifier.
            routing: the new defense's routing (None: this one's).
        """
        other = DADDefense(self.classifier, self.detector, None, self.noise_std, self.noise, self.sample_detector,
                           routing or self.routing, purifier)
        other.joint = self.joint
        return other

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
        """The purification path: the diffusion purifier, or noise then denoiser; images in [0, 1] out."""
        if self.purifier is not None:
            return self.purifier(x)
        return purify(self.denoiser, x, self.noise_std, self.noise)

    def purify_runs(self, x: Tensor, count: int) -> list[Tensor]:
        """``count`` independent purifications of ``x``, as ``count`` calls of :meth:`purify` give them (a purifier
        may share the work that does not depend on the noise, such as SSNI's timesteps)."""
        if self.purifier is not None:
            return self.purifier.runs(x, count)
        return [self.purify(x) for _ in range(count)]

    def classify_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of the classifier and the detector's features of ``x`` (one pass when phi is the classifier)."""
        return logits_and_features(self.classifier, self.detector.kernel, x)

    def detect(self, x: Tensor, features: Tensor) -> Detection:
        """The detectors' verdict on the batch ``x`` under the current routing (``features``: ``phi(x)``)."""
        batch_excess = sample_excess = None
        if self.routing in ("never", "always"):  # a fixed route: no detector runs, the statistic is 0
            purified = self.routing == "always"
            fixed = torch.tensor(1.0 if purified else -1.0, device=x.device)
            return Detection(x.new_zeros(()), fixed, None, torch.full((x.shape[0],), purified, device=x.device))
        if self.routing == "sample":
            scores = self.sample_detector.scores(x, features)  # type: ignore[union-attr]
            sample_excess = relative_excess(scores, self.sample_detector.threshold)  # type: ignore[union-attr]
            return Detection(scores.mean(), None, sample_excess, sample_excess > 0)
        score = self.detector.score(x, features)
        if self.routing == "batch":
            batch_excess = relative_excess(score, self.detector.threshold_for(x.shape[0]))
            return Detection(score, batch_excess, None, (batch_excess > 0).expand(x.shape[0]))
        batch_threshold, sample_threshold = self.joint.thresholds_for(x.shape[0])
        batch_excess = relative_excess(score, batch_threshold)
        sample_excess = relative_excess(self.sample_detector.scores(x, features), sample_threshold)  # type: ignore
        return Detection(score, batch_excess, sample_excess, (batch_excess > 0) | (sample_excess > 0))

    def forward_with_info(self, x: Tensor) -> DefenseOutput:
        """Route the input and return logits, the detection statistic and the decisions."""
        out = self.forward_draws(x, 1)
        return DefenseOutput(logits=out.logits[0], score=out.score, adversarial=out.adversarial, flags=out.flags)

    def forward_draws(self, x: Tensor, draws: int) -> DefenseOutput:
        """``draws`` independent passes of the defense on the batch ``x``: logits of shape ``(draws, B, K)``.

        The detection does not depend on the noise, so it is computed once, and images judged clean are
        deterministic: only the flagged images are purified, ``draws`` times.
        """
        check_images(x, self.image_shape, min_batch=1 if self.routing in ("sample", "never", "always") else 2)
        if draws < 1:
            raise ValueError(f"Expected `draws` >= 1, got {draws}")
        x = x.to(self.detector.reference.dtype)  # float16/float64 callers get the model's precision
        logits, features = self.classify_with_features(x)
        detection = self.detect(x, features)
        flags = detection.flags
        stacked = logits.expand(draws, *logits.shape)
        if bool(flags.all()):
            stacked = torch.stack([self.classifier(p) for p in self.purify_runs(x, draws)])
        elif bool(flags.any()):
            purified = torch.stack([self.classifier(p) for p in self.purify_runs(x[flags], draws)])
            stacked = stacked.clone()
            stacked[:, flags] = purified
        return DefenseOutput(logits=stacked, score=detection.score, adversarial=flags.any(), flags=flags)

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
            "routing": self.routing,
            "sample_score": self.sample_detector.kind if self.sample_detector is not None else None,
            "purifier": purifier_spec(self.purifier) if self.purifier is not None else None,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        atomic_torch_save(payload, path)


def load_defense(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                 checkpoint: bool = False) -> DADDefense:
    """Rebuild a :class:`DADDefense` from :meth:`DADDefense.save`'s file.

    The file is read with ``weights_only=True``: only tensors and plain data are accepted, so a file
    from elsewhere can never run code. The networks are rebuilt by :func:`~dad.networks.build_networks`, a
    diffusion purifier (format 4) by :func:`~dad.diffusion.build_purifier`; older formats load unchanged.

    Args:
        path: the file.
        map_location: where the tensors are loaded.
        checkpoint: gradient checkpointing of a diffusion purifier's reverse process (a memory setting: full
            gradients through long reverse processes).
    """
    path = Path(path)
    missing = f"No saved defense at {path}: run `train.py pipeline` first (it writes defense.pt)"
    payload = read_tagged(path, _FORMAT, _READABLE, "DAD defense", missing, map_location)
    state = payload["state_dict"]
    if payload["version"] < 3:  # no joint thresholds before per-sample routing
        state = {**state, **{f"joint.{k}": v for k, v in JointThresholds().state_dict().items()}}
    classifier, kernel, denoiser = build_networks(_networks_of(payload))
    detector = MMDDetector(kernel, torch.zeros_like(state["detector.reference"]), target_fpr=payload["target_fpr"])
    sample_detector = None
    if payload.get("sample_score") is not None:
        sample_detector = SampleDetector(kernel, torch.zeros_like(state["sample_detector.clean"]),
                                         torch.zeros_like(state["sample_detector.adversarial"]),
                                         payload["sample_score"], payload["target_fpr"])
    try:
        purifier = build_purifier(payload["purifier"], checkpoint) if payload.get("purifier") is not None else None
        defense = DADDefense(classifier, detector, denoiser, payload["noise_std"], payload["noise"], sample_detector,
                             purifier=purifier)
        defense.load_state_dict(state)
    except (KeyError, TypeError, ValueError) as err:
        raise IncompatibleFileError(f"{path} does not describe a defense: {str(err).splitlines()[0]}") from None
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise IncompatibleFileError(f"{path} does not match its stored architecture: {first}") from None
    defense.routing = payload.get("routing", "batch")
    return defense.eval()


def _networks_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The network specs of a saved defense, from either file version."""
    if payload["version"] >= 2:
        return payload["networks"]
    specs = payload["specs"]
    phi = None if payload["shares_features"] else specs["feature_extractor"]
    return {"classifier": specs["classifier"], "denoiser": specs["denoiser"],
            "kernel": {"feature_extractor": phi, "train_features": payload["train_features"]}}
