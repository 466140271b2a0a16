"""The evaluation section of a run (``eval.py``): attacks, detection metrics, mixed batches, transfer, sanity.

Part of the run configuration (:mod:`pipeline.config`), which the pipeline owns; :mod:`evaluation` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dad.attacks import AttackSpec
from dad.routing import Routing

__all__ = ["EvalSettings", "TransferSettings", "paper_attacks"]

_LINF, _L2 = 8 / 255, 0.5


def paper_attacks() -> dict[str, AttackSpec]:
    """The paper-scale suite (CIFAR-10 threat models: Linf 8/255, L2 0.5), for GPUs."""
    linf: dict[str, Any] = {"norm": "linf", "eps": _LINF, "step_size": 2 / 255}
    white_box: dict[str, Any] = {"threat": "defense", "name": "pgd", **linf, "steps": 200, "eot_samples": 20}
    return {
        "pgd_linf": AttackSpec(name="pgd", **linf, steps=20),
        "pgd_l2": AttackSpec(name="pgd", norm="l2", eps=_L2, step_size=0.1, steps=20),
        "mma_linf": AttackSpec(name="mma", **linf, steps=20, k=3),
        "cw_l2": AttackSpec(name="cw_l2", norm="l2", eps=_L2, steps=100, step_size=0.01),
        "autoattack_linf": AttackSpec(name="autoattack", **linf, steps=100),
        "adaptive_pgd_eot": AttackSpec(**white_box, mmd_weight=1.0),
        "evade_clean": AttackSpec(**{**white_box, "eot_samples": 1}, objective="evade_clean",
                                  lambdas=[1.0, 10.0, 100.0]),
        "evade_denoised": AttackSpec(**white_box, objective="evade_denoised", lambdas=[1.0]),
        "evade_bpda": AttackSpec(**white_box, objective="evade_bpda", lambdas=[0.0, 1.0]),
        "autoattack_rand": AttackSpec(name="apgd", threat="defense", loss="ce+dlr", norm="linf", eps=_LINF,
                                      steps=100, eot_samples=20),
        "apgd_evade_clean": AttackSpec(name="apgd", threat="defense", objective="evade_clean", loss="ce+dlr",
                                       norm="linf", eps=_LINF, steps=100, lambdas=[1.0, 10.0]),
        "square_eot": AttackSpec(name="square", threat="defense", norm="linf", eps=_LINF, steps=5000,
                                 eot_samples=20),
    }


@dataclass(frozen=True)
class TransferSettings:
    """The transfer evaluation: classifier-only attacks crafted on another model of the factory, and attacks through
    the defense crafted on other defenses (masking checks: a route or a kernel whose gradients mislead the attacks
    made on it still falls to AEs made on one whose gradients do not).

    Attributes:
        attacks: names of classifier-threat attacks of ``eval.attacks`` to re-craft on the source model
            (reported as ``transfer_<name>``); empty: no transfer evaluation.
        model, model_kwargs: the source architecture (None: the defended classifier's).
        weights: a trained source's weights file; None: trained here on the training split.
        epochs, lr, seed: the quick training of the source (Adam, cosine schedule).
        defenses: other saved defenses by name (``defense.pt`` files, e.g. the same run with the published
            denoiser, or with the standard kernel), each attacked under its saved routing.
        defense_attacks: names of defense-threat attacks of ``eval.attacks`` crafted on each of ``defenses`` and
            judged on this one (reported as ``transfer_<defense>_<attack>``, on the images of the attacks through
            the defense).
    """

    attacks: list[str] = field(default_factory=list)
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    epochs: int = 3
    lr: float = 2e-3
    seed: int = 1
    defenses: dict[str, str] = field(default_factory=dict)
    defense_attacks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if bool(self.defenses) != bool(self.defense_attacks):
            raise ValueError("`eval.transfer.defenses` and `eval.transfer.defense_attacks` go together: name the "
                             "defenses and the attacks through the defense to craft on them")
        if self.epochs < 1:
            raise ValueError(f"Expected `eval.transfer.epochs` >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"Expected `eval.transfer.lr` > 0, got {self.lr}")


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation (``eval.py``): the attacks, detection metrics, mixed batches, transfer and sanity checks.

    Attributes:
        attacks: named attacks on whole batches (each an :class:`~dad.attacks.AttackSpec`).
        defense: the defense file to evaluate, relative to the run directory (None: ``defense.pt``), e.g. a
            diffusion purifier's ``defense_ssni_n.pt``; the reports are then ``report_<name>.{json,md}``.
        purifier_checkpointing: recompute each step of a diffusion purifier's reverse process in the backward pass
            instead of storing it (full gradients through long reverse processes in less memory, at more compute).
        routing: evaluate the defense under this routing (``batch``, ``sample`` or ``both``, or the baselines
            ``never``: the classifier alone, ``always``: every image purified) instead of the one it was saved
            with; the reports are then ``report_[<name>_]<routing>.{json,md}``.
        draws: noise draws per evaluation of a randomised defense: a sample counts as robust only if it is
            classified correctly in every draw (the mean over draws is reported beside it).
        detection_batch_sizes: batch sizes of the detection metrics (AUROC, TPR, FPR).
        random_batches: random batches drawn per batch size for the detection metrics.
        max_test: cap on the number of attacked test images (None: all); the clean FPR uses every test image.
        max_test_defense: a smaller cap for the attacks through the defense (None: ``max_test``); their
            intervals say what that costs.
        mixed_attacks: attacks of ``attacks`` that are also run on mixed batches: each attacked image is an AE
            among clean filler from the other test images, once per fraction of ``mixed_fractions``.
        mixed_fractions: shares of AEs per mixed batch (in (0, 1)).
        transfer: the transfer evaluation.
        sanity_attack: the full-white-box attack the sanity checks re-run (None: the strongest one of the
            primary threat model, that of the first full-white-box attack).
        sanity_samples: test images the re-runs use (the first ones, rounded up to whole batches).
        sweep_factors: multiples of the attack's ``eps`` of the eps sweep (the largest must reach chance).
        sanity_z: noise level of the sanity comparisons and of the FPR check, in standard errors.
        plots: write PNG plots (and log them to TensorBoard).
        max_run_images: the most images one network pass of an attack's batched runs takes (EOT samples, noise
            draws, stacked runs: runs times batch size; more runs go in chunks, with the same results); None: no cap
            on an accelerator, :data:`~dad.runs.CPU_PASS_ELEMENTS` worth of images on a CPU. A memory and speed
            setting (:mod:`dad.runs`), not part of the attacks' settings.
        channels_last: the defense's networks in channels-last memory format (the same numbers up to the order of
            floating-point sums); None: on a CPU only, where it made the attacks through the defense 1.2-1.5x faster
            (CIFAR-10 CPU scale, a batch of 100 on 1 thread of an AMD EPYC: evade_denoised 10.0 -> 6.7 s,
            autoattack_rand 37.7 -> 28.3 s, evade_clean 25.8 -> 18.2 s, square_eot 79.5 -> 66.2 s); a speed setting.
        resume: reuse per-attack results saved in ``eval_state/`` when their configuration matches.
    """

    attacks: dict[str, AttackSpec] = field(default_factory=paper_attacks)
    defense: str | None = None
    purifier_checkpointing: bool = False
    routing: Routing | None = None
    draws: int = 3
    detection_batch_sizes: list[int] = field(default_factory=lambda: [10, 25, 50, 100])
    random_batches: int = 1000
    max_test: int | None = None
    max_test_defense: int | None = None
    mixed_attacks: list[str] = field(default_factory=lambda: ["pgd_linf", "apgd_evade_clean"])
    mixed_fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    transfer: TransferSettings = field(default_factory=TransferSettings)
    sanity_attack: str | None = None
    sanity_samples: int = 500
    sweep_factors: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.5])
    sanity_z: float = 2.0
    plots: bool = True
    max_run_images: int | None = None
    channels_last: bool | None = None
    resume: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.random_batches >= 1, f"Expected `eval.random_batches` >= 1, got {self.random_batches}"),
            (self.draws >= 1, f"Expected `eval.draws` >= 1, got {self.draws}"),
            (self.max_test is None or self.max_test >= 2, f"Expected `eval.max_test` >= 2, got {self.max_test}"),
            (self.max_test_defense is None or self.max_test_defense >= 2,
             f"Expected `eval.max_test_defense` >= 2, got {self.max_test_defense}"),
            (all(b >= 2 for b in self.detection_batch_sizes),
             f"Expected `eval.detection_batch_sizes` >= 2, got {self.detection_batch_sizes}"),
            (all(0.0 < p < 1.0 for p in self.mixed_fractions),
             f"Expected `eval.mixed_fractions` in (0, 1), got {self.mixed_fractions}"),
            (self.sanity_samples >= 2, f"Expected `eval.sanity_samples` >= 2, got {self.sanity_samples}"),
            (bool(self.sweep_factors) and all(f > 0 for f in self.sweep_factors),
             f"Expected positive `eval.sweep_factors`, got {self.sweep_factors}"),
            (self.sanity_z > 0, f"Expected `eval.sanity_z` > 0, got {self.sanity_z}"),
            (self.max_run_images is None or self.max_run_images >= 1,
             f"Expected `eval.max_run_images` >= 1 or null, got {self.max_run_images}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.defense is not None and (not self.defense.endswith(".pt") or "/" in self.defense):
            raise ValueError(f"Expected `eval.defense` to name a .pt file of the run directory, got {self.defense!r}")
        threats = {name: spec.threat for name, spec in self.attacks.items()}
        for setting, names, allowed in (("eval.transfer.attacks", self.transfer.attacks, ("classifier",)),
                                        ("eval.transfer.defense_attacks", self.transfer.defense_attacks, ("defense",)),
                                        ("eval.mixed_attacks", self.mixed_attacks, ("classifier", "defense")),
                                        ("eval.sanity_attack", [self.sanity_attack] * (self.sanity_attack is not None),
                                         ("defense",))):
            for name in names:
                if threats.get(name) not in allowed:
                    kinds = " or ".join(f"threat-{t}" for t in allowed)
                    raise ValueError(f"`{setting}` must name a {kinds} attack of `eval.attacks`, got {name!r}")
