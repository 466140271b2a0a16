"""The defense section of a run (``train.py defense``): reference set, calibration, routing, the purified route."""

from __future__ import annotations

from dataclasses import dataclass, field

from dad.detector import TARGET_FPR
from dad.route_selection import RouteSelectionSettings
from dad.routing import Routing
from dad.sample_detector import SampleScore

__all__ = ["DefenseSettings"]


@dataclass(frozen=True)
class DefenseSettings:
    """The assembled defense: reference set, calibration, the inference batch size and the purified route.

    Attributes:
        reference_size: clean reference images (drawn from the MMD set) each batch is tested against.
        target_fpr: the detector's false-positive rate on clean batches (and images, per sample).
        calibration_batches: random clean batches drawn per calibrated batch size.
        batch_size: the inference (detection) batch; the evaluation attacks batches of this size.
        routing: ``batch`` (the paper's: the batch's MMD score routes the whole batch), ``sample`` (each image
            by its own score) or ``both``, or a baseline: ``never`` / ``always`` purify (see :mod:`dad.routing`);
            saved with the defense.
        sample_score: the per-sample score, ``witness`` or ``reference`` (see :mod:`dad.sample_detector`).
        witness_size: images of the MMD set (and their training AEs) the witness keeps (None: all of them). A
            score costs one product with the ``2 x witness_size`` stored images per batch, and the stored sets
            are saved in ``defense.pt``; 500 by default so that ImageNet's MMD set is not stored whole.
        flagged_classifier: a classifier stage's checkpoint of another run on the same data (e.g.
            ``runs/digits_robust/classifier/best.ckpt``, an adversarially trained backbone) that classifies what the
            routing flags, after the purifier, while this run's classifier keeps the clean route (None: this run's
            classifier classifies both). Saved inside ``defense.pt``.
        select: the choice of the purified route (:class:`~dad.route_selection.RouteSelectionSettings`), measured
            with the flagged classifier in place.
    """

    reference_size: int = 100
    target_fpr: float = TARGET_FPR
    calibration_batches: int = 1000
    batch_size: int = 100
    routing: Routing = "batch"
    sample_score: SampleScore = "witness"
    witness_size: int | None = 500
    flagged_classifier: str | None = None
    select: RouteSelectionSettings = field(default_factory=RouteSelectionSettings)

    def __post_init__(self) -> None:
        """Raise ``ValueError`` (a one-line ``ConfigError`` once parsed) for a value out of range."""
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"Expected `defense.target_fpr` in (0, 1), got {self.target_fpr}")
        for name in ("reference_size", "batch_size"):
            if getattr(self, name) < 2:
                raise ValueError(f"Expected `defense.{name}` >= 2, got {getattr(self, name)}")
        if self.calibration_batches < 1:
            raise ValueError(f"Expected `defense.calibration_batches` >= 1, got {self.calibration_batches}")
        if self.witness_size is not None and self.witness_size < 2:
            raise ValueError(f"Expected `defense.witness_size` >= 2, got {self.witness_size}")
        if self.flagged_classifier == "":
            raise ValueError("`defense.flagged_classifier` is empty: give a classifier checkpoint or leave it unset")
