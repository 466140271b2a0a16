"""DADDefense: the assembled defense as a plain ``nn.Module`` (no Lightning at inference).

Images in [0, 1] go in, logits come out. MMD-OPT judges the input against clean reference data, per batch or per
image (a :class:`~dad.routing.Router` per mode, :mod:`dad.routing`); what is judged clean goes straight to the
classifier, what is judged adversarial is purified (a :class:`~dad.purification.Purifier`: DAD's noise and
denoiser, a diffusion purifier, or none) and then classified. So the same harness runs the classifier alone
(routing ``never``), a purifier alone (``always``) and DAD with any purifier. The scores and decisions are exposed
for logging and for attacks that know them. The defense is the one owner of its calibration (:meth:`calibrate`)
and of its target false-positive rate; :mod:`dad.defense_file` saves and loads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dad.detector import TARGET_FPR, MMDDetector, check_fpr
from dad.io import atomic_torch_save
from dad.networks import logits_and_features, model_spec, network_specs
from dad.purification import Purifier
from dad.routing import ROUTERS, Detection, Detectors, Router, Routing
from dad.defense_runs import DefenseOutput, KnownRows, forward_runs
from dad.runs import run_chunks
from dad.sample_detector import SampleDetector

__all__ = ["DADDefense", "DefenseOutput", "KnownRows", "InvalidInputError", "check_images", "FORMAT", "VERSION"]

FORMAT = "dad-defense"
VERSION = 6
"""The saved defense's format (5: one purifier of any kind, one router state per mode; 6: a second classifier for
the images the routing flags, optional)."""


class InvalidInputError(ValueError):
    """Raised for inputs the defense must not silently process (wrong shape, NaN/inf, outside [0, 1])."""


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


class DADDefense(nn.Module):
    """Classifier + MMD-OPT detectors + a purifier, routing per batch, per image or both (:mod:`dad.routing`).

    Args:
        classifier: maps images in [0, 1] to logits; if it is also the kernel's feature extractor,
            one forward pass yields both the logits and the detection features.
        detector: the batch MMD detector.
        purifier: what a flagged image goes through (:mod:`dad.purification`).
        sample_detector: the per-sample detector (needed by the ``sample`` and ``both`` routings).
        routing: a mode of :data:`~dad.routing.ROUTERS`; settable on a built or loaded defense.
        target_fpr: the share of clean images the calibrated defense purifies (saved with it).
        flagged_classifier: what classifies the purified images (e.g. an adversarially trained backbone behind a
            standard ``classifier``: the clean route keeps the standard accuracy); None: ``classifier``.
    """

    def __init__(self, classifier: nn.Module, detector: MMDDetector, purifier: Purifier, *,
                 sample_detector: SampleDetector | None = None, routing: Routing = "batch",
                 target_fpr: float = TARGET_FPR, flagged_classifier: nn.Module | None = None) -> None:
        super().__init__()
        check_fpr(target_fpr)
        self.classifier = classifier
        self.flagged_classifier = flagged_classifier
        self.detector = detector
        self.purifier = purifier
        self.sample_detector = sample_detector
        self.routers = nn.ModuleDict({name: router() for name, router in ROUTERS.items()})  # each with its state
        self.target_fpr = target_fpr
        self.routing = routing
        self.route_selection: dict[str, Any] | None = None  # the defense stage's choice of purifier, if it chose

    @property
    def routing(self) -> Routing:
        """The routing mode's name (see :mod:`dad.routing`)."""
        return self._routing

    @routing.setter
    def routing(self, mode: Routing) -> None:
        if mode not in ROUTERS:
            raise ValueError(f"Expected `routing` in {tuple(ROUTERS)}, got {mode!r}")
        if ROUTERS[mode].needs_sample_detector and self.sample_detector is None:
            raise ValueError(f"`routing: {mode}` needs a per-sample detector; this defense has none (it was saved "
                             "before per-sample routing existed: re-run `train.py defense`)")
        self._routing = mode

    @property
    def router(self) -> Router:
        """The router of the current mode."""
        return self.routers[self.routing]  # type: ignore[return-value]

    @property
    def detectors(self) -> Detectors:
        return Detectors(self.detector, self.sample_detector)

    def with_purifier(self, purifier: Purifier, routing: Routing | None = None) -> DADDefense:
        """This defense with ``purifier`` instead of its own, sharing the classifier, detectors and thresholds.

        Args:
            purifier: the new purifier.
            routing: the new defense's routing (None: this one's).
        """
        other = DADDefense(self.classifier, self.detector, purifier, sample_detector=self.sample_detector,
                           routing=routing or self.routing, target_fpr=self.target_fpr,
                           flagged_classifier=self.flagged_classifier)
        other.routers = self.routers
        return other

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.detector.reference.shape[1:])

    @property
    def shares_features(self) -> bool:
        """Whether the kernel's ``phi`` is the classifier itself (one forward pass serves both)."""
        return self.detector.kernel.phi is self.classifier

    @property
    def route_classifier(self) -> nn.Module:
        """The classifier of the purified route: :attr:`flagged_classifier` where there is one."""
        return self.classifier if self.flagged_classifier is None else self.flagged_classifier

    @property
    def specs(self) -> dict[str, Any]:
        """The networks as plain data (:func:`~dad.networks.network_specs`; ``flagged_classifier``: a model spec or
        None)."""
        flagged = None if self.flagged_classifier is None else model_spec(self.flagged_classifier)
        return {**network_specs(self.classifier, self.detector.kernel), "flagged_classifier": flagged}

    def purify(self, x: Tensor) -> Tensor:
        """The purifier's output for ``x`` (one draw of its randomness), images in [0, 1]."""
        return self.purifier(x)

    def purify_runs(self, x: Tensor, count: int) -> Tensor:
        """``count`` independent purifications of ``x``, shape ``(count, *x.shape)`` (:meth:`Purifier.runs`)."""
        return self.purifier.runs(x, count)

    def logits_of_runs(self, images: Tensor) -> Tensor:
        """The purified route's classifier's logits of runs of purified images ``(R, m, ...)``, shape ``(R, m, K)``:
        the runs of a chunk (:func:`~dad.runs.run_chunks`) in one pass."""
        runs, m = images.shape[:2]
        parts, start = [], 0
        for size in run_chunks(runs, m, images[0, 0]):
            parts.append(self.route_classifier(images[start:start + size].reshape(size * m, *images.shape[2:])))
            start += size
        return torch.cat(parts).view(runs, m, -1)

    def known_rows(self, images: Tensor) -> KnownRows:
        """``images`` with their classifier pass, to append to batches without passing them again
        (:class:`KnownRows`); a stack ``(G, m, ...)`` gives each group of runs its own rows
        (:func:`~dad.defense_runs.stack_rows`)."""
        with torch.no_grad():
            images = images.to(self.detector.reference.dtype)
            logits, features = self.classify_with_features(images.reshape(-1, *self.image_shape))
        lead = images.shape[: images.dim() - len(self.image_shape)]
        return KnownRows(images, logits.view(*lead, -1), features.view(*lead, *features.shape[1:]))

    def classify_with_features(self, x: Tensor, known: KnownRows | None = None) -> tuple[Tensor, Tensor]:
        """Logits of the classifier and the detector's features of ``x`` (one pass when phi is the classifier),
        then those of the ``known`` rows (the batch is ``cat(x, known.images)``)."""
        logits, features = logits_and_features(self.classifier, self.detector.kernel, x)
        if known is None:
            return logits, features
        return torch.cat([logits, known.logits.to(logits)]), torch.cat([features, known.features.to(features)])

    def detect(self, x: Tensor, features: Tensor) -> Detection:
        """The detectors' verdict on the batch ``x`` under the current routing (``features``: ``phi(x)``)."""
        return self.router.decide(x, features, self.detectors)

    def forward_with_info(self, x: Tensor) -> DefenseOutput:
        """Route the input and return logits, the detection statistic and the decisions."""
        out = self.forward_draws(x, 1)
        return DefenseOutput(logits=out.logits[0], score=out.score, adversarial=out.adversarial, flags=out.flags)

    def forward_draws(self, x: Tensor, draws: int, known: KnownRows | None = None, validate: bool = True,
                      first: int | None = None) -> DefenseOutput:
        """``draws`` independent passes of the defense on the batch ``cat(x, known.images)``: logits of shape
        ``(draws, B, K)``, or of its ``first`` images only (an attack's own; the rest is scored and routed, as it must
        be, but not classified again).

        The detection does not depend on the noise, so it is computed once, and images judged clean are
        deterministic: only the purification and the classification of its output run ``draws`` times, as one
        batch (:mod:`dad.runs`); the batch is a stack of one run (:func:`~dad.defense_runs.forward_runs`).
        ``validate=False`` skips the input checks (attacks, whose iterates are valid by construction).
        """
        if draws < 1:
            raise ValueError(f"Expected `draws` >= 1, got {draws}")
        if validate:
            check_images(x if known is None else torch.cat([x, known.images.to(x)]), self.image_shape,
                         min_batch=self.router.min_batch)
        out = forward_runs(self, x[None], draws, known, first)  # one run: float16/float64 get the model's precision
        return DefenseOutput(logits=out.logits[:, 0], score=out.score[0], adversarial=out.adversarial[0],
                             flags=out.flags[0])

    def routed_draws(self, x: Tensor, logits: Tensor, flags: Tensor, draws: int) -> Tensor:
        """``draws`` passes' logits ``(draws, B, K)`` given the clean path's ``logits`` and the routing's ``flags``.

        On an accelerator every image is purified and the routing selects with ``torch.where`` (no host
        synchronisation); on the CPU, where compute is the cost, only the flagged images are.
        """
        stacked = logits.expand(draws, *logits.shape)
        if self._purifies_every_image(x):
            return torch.where(flags[None, :, None], self.logits_of_runs(self.purify_runs(x, draws)), stacked)
        if bool(flags.all()):
            return self.logits_of_runs(self.purify_runs(x, draws))
        if bool(flags.any()):
            stacked = stacked.clone()
            stacked[:, flags] = self.logits_of_runs(self.purify_runs(x[flags], draws))
        return stacked

    @staticmethod
    def _purifies_every_image(x: Tensor) -> bool:
        """Whether :meth:`forward_draws` purifies every image and selects on the device (off the CPU)."""
        return x.device.type != "cpu"

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_info(x).logits

    @torch.no_grad()
    def calibrate(self, clean: Tensor, batch_sizes: Sequence[int], target_fpr: float | None = None,
                  num_batches: int = 1000, seed: int = 0) -> dict[str, Any]:
        """Calibrate every detecting mode's thresholds on the clean pool ``clean`` at ``target_fpr`` (None: the
        defense's), whatever the current routing (it stays settable). The one calibration entry.

        Each mode draws its random batches with a CPU generator seeded ``seed + router.stream``. Returns the
        results per mode (``{"batch": {size: ...}, "sample": {...}, "both": {size: ...}}``, the modes this defense
        can run).
        """
        if target_fpr is not None:
            check_fpr(target_fpr)
            self.target_fpr = target_fpr
        results = {}
        for name, router in self.routers.items():
            if router.detecting and (self.sample_detector is not None or not router.needs_sample_detector):
                generator = torch.Generator().manual_seed(seed + router.stream)  # cpu: same draws on any device
                results[name] = router.calibrate(self.detectors, clean, batch_sizes, self.target_fpr, num_batches,
                                                 generator)
        return results

    def purified_share(self, pool: Tensor, batch_size: int, num_batches: int,
                       generator: torch.Generator | None = None) -> float:
        """The share of the clean images of ``pool`` the defense purifies under its routing, on random batches."""
        return self.router.purified_share(self.detectors, pool, batch_size, num_batches, generator)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the defense to one file, atomically (temporary file, then rename), read back by
        :func:`dad.defense_file.load_defense`. Plain data and tensors only: the networks' and the purifier's specs."""
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "networks": self.specs,
            "purifier": self.purifier.spec(),
            "target_fpr": self.target_fpr,
            "routing": self.routing,
            "sample_score": self.sample_detector.kind if self.sample_detector is not None else None,
            "route_selection": self.route_selection,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        atomic_torch_save(payload, path)
