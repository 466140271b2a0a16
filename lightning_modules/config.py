"""The run configuration: one dataclass per section, parsed from YAML and ``--section.field`` flags.

The sections mirror the pipeline: ``run``, ``data``, ``trainer`` (shared Trainer settings),
``classifier``, ``attack`` (the AEs the kernel and denoiser are trained on), ``kernel``, ``denoiser``,
``defense`` (reference set and calibration) and ``eval``. Parsing uses jsonargparse, the library behind
LightningCLI, so the conventions are the same: ``--config file.yaml``, dotted flags, typed values,
``--print_config``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from dad.attacks.config import AttackConfig
from dad.attacks.presets import AttackPreset

__all__ = [
    "RunConfig", "DataConfig", "TrainerConfig", "ClassifierConfig", "KernelConfig", "DenoiserConfig",
    "DefenseConfig", "EvalConfig", "PipelineConfig", "ConfigError", "add_config_arguments", "config_from_namespace",
    "load_config", "dump_config",
]


class ConfigError(ValueError):
    """An invalid configuration value."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class RunConfig:
    """Where the run lives: ``<root>/<name>/``; ``seed`` seeds every stage; ``last.ckpt`` is written every
    ``checkpoint_every_n_steps`` training steps (None: at the end of every epoch)."""

    name: str = "default"
    root: str = "runs"
    seed: int = 0
    checkpoint_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, f"Expected a plain `run.name`, got {self.name!r}")
        _require(self.checkpoint_every_n_steps is None or self.checkpoint_every_n_steps >= 1,
                 f"Expected `run.checkpoint_every_n_steps` >= 1, got {self.checkpoint_every_n_steps}")

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass
class DataConfig:
    """The dataset and its DAD splits (see :mod:`datamodules.base`)."""

    dataset: Literal["digits", "cifar10", "cifar100", "svhn", "imagefolder"] = "digits"
    root: str | None = None
    download: bool = False
    mmd_per_class: int = 20
    val_size: int = 500
    test_size: int = 450
    calibration_size: int = 0
    subset: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.mmd_per_class >= 1, f"Expected `data.mmd_per_class` >= 1, got {self.mmd_per_class}")
        _require(self.val_size >= 2, f"Expected `data.val_size` >= 2, got {self.val_size}")
        _require(self.calibration_size >= 0, f"Expected `data.calibration_size` >= 0, got {self.calibration_size}")
        _require(self.batch_size >= 1, f"Expected `data.batch_size` >= 1, got {self.batch_size}")


@dataclass
class TrainerConfig:
    """Trainer settings shared by every stage (``--trainer.devices 8 --trainer.strategy ddp`` ...)."""

    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool = False
    enable_progress_bar: bool = True
    log_every_n_steps: int = 10
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None

    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ClassifierConfig:
    """Stage 0: the classifier. ``weights`` loads a trained one from a file instead of training."""

    model: str = "small_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    epochs: int = 15
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: Literal["cosine", "none"] = "cosine"

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"Expected `classifier.epochs` >= 1, got {self.epochs}")
        _require(self.lr > 0, f"Expected `classifier.lr` > 0, got {self.lr}")


@dataclass
class KernelConfig:
    """Stage 1: MMD-OPT. ``batch_size`` None trains full batch (the paper's 500 vs 500)."""

    steps: int = 200
    lr: float = 2e-4
    batch_size: int | None = None
    train_features: bool = False
    feature_extractor: str | None = None
    feature_extractor_kwargs: dict[str, Any] = field(default_factory=dict)
    feature_extractor_ckpt: str | None = None
    reg: float = 1e-8

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"Expected `kernel.steps` >= 1, got {self.steps}")
        _require(self.lr > 0, f"Expected `kernel.lr` > 0, got {self.lr}")
        _require(self.batch_size is None or self.batch_size >= 2,
                 f"Expected an MMD batch of at least 2 (`kernel.batch_size`), got {self.batch_size}")


@dataclass
class DenoiserConfig:
    """Stage 2: the denoiser (paper: Adam 1e-3, x0.1 at epoch 45, 60 epochs, batch 100, alpha 0.01)."""

    epochs: int = 60
    batch_size: int = 100
    lr: float = 1e-3
    milestones: list[int] = field(default_factory=lambda: [45])
    gamma: float = 0.1
    alpha: float = 0.01
    noise_std: float = 0.25
    noise: Literal["one_sided", "symmetric"] = "one_sided"
    estimator: Literal["biased", "unbiased"] = "biased"
    net: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"Expected `denoiser.epochs` >= 1, got {self.epochs}")
        _require(self.batch_size >= 2, f"Expected an MMD batch of at least 2 (`denoiser.batch_size`), got {self.batch_size}")
        _require(self.alpha >= 0, f"Expected `denoiser.alpha` >= 0, got {self.alpha}")
        _require(self.noise_std >= 0, f"Expected `denoiser.noise_std` >= 0, got {self.noise_std}")


@dataclass
class DefenseConfig:
    """The assembled defense: reference set, calibration and the inference batch size."""

    reference_size: int = 100
    target_fpr: float = 0.05
    calibration_batches: int = 1000
    batch_size: int = 100

    def __post_init__(self) -> None:
        _require(0.0 < self.target_fpr < 1.0, f"Expected `defense.target_fpr` in (0, 1), got {self.target_fpr}")
        _require(self.reference_size >= 2, f"Expected `defense.reference_size` >= 2, got {self.reference_size}")
        _require(self.batch_size >= 2, f"Expected `defense.batch_size` >= 2, got {self.batch_size}")
        _require(self.calibration_batches >= 1,
                 f"Expected `defense.calibration_batches` >= 1, got {self.calibration_batches}")


_LINF, _L2 = 8 / 255, 0.5


def _default_attacks() -> dict[str, dict[str, Any]]:
    """The paper-scale suite (CIFAR-10 threat models: Linf 8/255, L2 0.5), for GPUs."""
    linf = {"norm": "linf", "eps": _LINF, "step_size": 2 / 255}
    white_box = {"threat": "defense", "name": "pgd", **linf, "steps": 200, "eot_samples": 20}
    return {
        "pgd_linf": {"name": "pgd", "threat": "classifier", **linf, "steps": 20},
        "pgd_l2": {"name": "pgd", "threat": "classifier", "norm": "l2", "eps": _L2, "step_size": 0.1, "steps": 20},
        "mma_linf": {"name": "mma", "threat": "classifier", **linf, "steps": 20, "k": 3},
        "cw_l2": {"name": "cw_l2", "threat": "classifier", "norm": "l2", "eps": _L2, "steps": 100, "step_size": 0.01},
        "autoattack_linf": {"name": "autoattack", "threat": "classifier", **linf, "steps": 100},
        "adaptive_pgd_eot": {**white_box, "mmd_weight": 1.0},
        "evade_clean": {**white_box, "objective": "evade_clean", "eot_samples": 1, "lambdas": [1.0, 10.0, 100.0]},
        "evade_denoised": {**white_box, "objective": "evade_denoised", "lambdas": [1.0]},
        "evade_bpda": {**white_box, "objective": "evade_bpda", "lambdas": [0.0, 1.0]},
        "autoattack_rand": {"name": "autoattack", "threat": "defense", "norm": "linf", "eps": _LINF, "steps": 100,
                            "eot_samples": 20},
    }


@dataclass
class TransferConfig:
    """The transfer evaluation: classifier-only attacks crafted on another model of the factory.

    Attributes:
        attacks: names of classifier-threat attacks of ``eval.attacks`` to re-craft on the source model
            (reported as ``transfer_<name>``); empty: no transfer evaluation.
        model, model_kwargs: the source architecture (None: the defended classifier's).
        weights: a trained source's weights file; None: trained here on the training split.
        epochs, lr, seed: the quick training of the source (Adam, cosine schedule).
    """

    attacks: list[str] = field(default_factory=list)
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    epochs: int = 3
    lr: float = 2e-3
    seed: int = 1

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"Expected `eval.transfer.epochs` >= 1, got {self.epochs}")
        _require(self.lr > 0, f"Expected `eval.transfer.lr` > 0, got {self.lr}")


@dataclass
class EvalConfig:
    """Evaluation (``eval.py``): the attacks, detection metrics, mixed batches, transfer and sanity checks.

    Attributes:
        attacks: named attacks, each an :class:`~dad.attacks.presets.AttackPreset` as a mapping.
        detection_batch_sizes: batch sizes of the detection metrics (AUROC, TPR, FPR).
        random_batches: random batches drawn per batch size for the detection metrics.
        max_test: cap on the number of test images (None: all).
        mixed_fractions: shares of AEs per batch in the mixed-batch evaluation.
        mixed_batches: random batches per share.
        mixed_attack: the classifier-threat attack whose AEs are mixed in (None: the first one).
        transfer: a :class:`TransferConfig` as a mapping.
        sanity_attack: the full-white-box attack the sanity checks re-run (None: the strongest one of the
            primary threat model, that of the first full-white-box attack).
        sanity_batches: evaluation batches the re-runs use (the first ones of the test split).
        sweep_factors: multiples of the attack's ``eps`` of the eps sweep (the largest must reach chance).
        sanity_z: noise level of the sanity comparisons, in standard errors.
        plots: write PNG plots (and log them to TensorBoard).
        resume: reuse per-attack results saved in ``eval_state/`` when their configuration matches.
    """

    attacks: dict[str, dict[str, Any]] = field(default_factory=_default_attacks)
    detection_batch_sizes: list[int] = field(default_factory=lambda: [10, 25, 50, 100])
    random_batches: int = 1000
    max_test: int | None = None
    mixed_fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 1.0])
    mixed_batches: int = 100
    mixed_attack: str | None = None
    transfer: dict[str, Any] = field(default_factory=dict)
    sanity_attack: str | None = None
    sanity_batches: int = 2
    sweep_factors: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 1.5, 2.5])
    sanity_z: float = 2.0
    plots: bool = True
    resume: bool = True

    def __post_init__(self) -> None:
        _require(self.random_batches >= 1, f"Expected `eval.random_batches` >= 1, got {self.random_batches}")
        _require(self.max_test is None or self.max_test >= 2, f"Expected `eval.max_test` >= 2, got {self.max_test}")
        _require(all(b >= 2 for b in self.detection_batch_sizes),
                 f"Expected `eval.detection_batch_sizes` >= 2, got {self.detection_batch_sizes}")
        _require(all(0.0 <= p <= 1.0 for p in self.mixed_fractions),
                 f"Expected `eval.mixed_fractions` in [0, 1], got {self.mixed_fractions}")
        _require(self.mixed_batches >= 1, f"Expected `eval.mixed_batches` >= 1, got {self.mixed_batches}")
        _require(self.sanity_batches >= 1, f"Expected `eval.sanity_batches` >= 1, got {self.sanity_batches}")
        _require(bool(self.sweep_factors) and all(f > 0 for f in self.sweep_factors),
                 f"Expected positive `eval.sweep_factors`, got {self.sweep_factors}")
        _require(self.sanity_z > 0, f"Expected `eval.sanity_z` > 0, got {self.sanity_z}")

    def transfer_config(self) -> TransferConfig:
        try:
            return TransferConfig(**self.transfer)
        except TypeError as err:
            raise ConfigError(f"Invalid `eval.transfer`: {err}") from None

    def attack_configs(self) -> dict[str, AttackPreset]:
        """The attacks as validated presets; also checks the names the other settings refer to."""
        try:
            presets = {name: AttackPreset(**spec) for name, spec in self.attacks.items()}
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Invalid `eval.attacks`: {err}") from None
        by_threat = {name: p.threat for name, p in presets.items()}
        for setting, names, threat in (("eval.transfer.attacks", self.transfer_config().attacks, "classifier"),
                                       ("eval.mixed_attack", [self.mixed_attack] * (self.mixed_attack is not None),
                                        "classifier"),
                                       ("eval.sanity_attack", [self.sanity_attack] * (self.sanity_attack is not None),
                                        "defense")):
            for name in names:
                _require(by_threat.get(name) == threat,
                         f"`{setting}` must name a threat-{threat} attack of `eval.attacks`, got {name!r}")
        return presets


@dataclass
class PipelineConfig:
    """The whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    attack: dict[str, Any] = field(default_factory=lambda: {"name": "mma"})
    kernel: KernelConfig = field(default_factory=KernelConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.training_attack()
        self.eval.attack_configs()
        _require(
            self.defense.reference_size >= self.defense.batch_size,
            f"The reference set ({self.defense.reference_size}) must be at least as large as the inference batch "
            f"({self.defense.batch_size}): raise `defense.reference_size` or lower `defense.batch_size`",
        )

    def training_attack(self) -> AttackConfig:
        """The attack that makes the kernel's and the denoiser's training AEs."""
        try:
            return AttackConfig(**self.attack)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Invalid `attack`: {err}") from None


_SECTIONS = {f.name: f for f in fields(PipelineConfig)}
_SECTION_TYPES: dict[str, Any] = {
    "run": RunConfig, "data": DataConfig, "trainer": TrainerConfig, "classifier": ClassifierConfig,
    "attack": dict[str, Any], "kernel": KernelConfig, "denoiser": DenoiserConfig, "defense": DefenseConfig,
    "eval": EvalConfig,
}


def add_config_arguments(parser: ArgumentParser) -> None:
    """Add ``--config`` and one ``--<section>.<field>`` flag per field to ``parser``."""
    parser.add_argument("--config", action=ActionConfigFile, help="YAML configuration file")
    for name, f in _SECTIONS.items():
        parser.add_argument(f"--{name}", type=_SECTION_TYPES[name], default=f.default_factory())


def _as_plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return {k: _as_plain(v) for k, v in vars(value).items()}
    return value


def config_from_namespace(ns: Namespace) -> PipelineConfig:
    """Build and validate the :class:`PipelineConfig` from parsed arguments."""
    kwargs: dict[str, Any] = {}
    for name in _SECTIONS:
        value = _as_plain(getattr(ns, name))
        if isinstance(_SECTION_TYPES[name], type) and isinstance(value, dict):
            value = _SECTION_TYPES[name](**value)
        kwargs[name] = value
    return PipelineConfig(**kwargs)


def dump_config(cfg: PipelineConfig) -> str:
    """The configuration as YAML (what ``runs/<name>/config.yaml`` holds)."""
    return yaml.safe_dump(asdict(cfg), sort_keys=False)


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML configuration file (a run's saved ``config.yaml`` or a preset)."""
    parser = ArgumentParser(exit_on_error=False)
    add_config_arguments(parser)
    return config_from_namespace(parser.parse_args(["--config", str(path)]))
