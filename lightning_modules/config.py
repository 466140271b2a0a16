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
    subset: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.mmd_per_class >= 1, f"Expected `data.mmd_per_class` >= 1, got {self.mmd_per_class}")
        _require(self.val_size >= 2, f"Expected `data.val_size` >= 2, got {self.val_size}")
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


def _default_attacks() -> dict[str, dict[str, Any]]:
    return {
        "pgd_linf": {"name": "pgd", "threat": "classifier"},
        "adaptive_pgd_eot": {"name": "pgd", "threat": "defense", "eot_samples": 5},
    }


@dataclass
class EvalConfig:
    """Evaluation: named attacks (each an :class:`~dad.attacks.config.AttackConfig` as a mapping),
    the batch sizes of the detection metrics, and an optional cap on the number of test images."""

    attacks: dict[str, dict[str, Any]] = field(default_factory=_default_attacks)
    detection_batch_sizes: list[int] = field(default_factory=lambda: [10, 25, 50, 100])
    random_batches: int = 1000
    max_test: int | None = None

    def attack_configs(self) -> dict[str, AttackConfig]:
        try:
            return {name: AttackConfig(**spec) for name, spec in self.attacks.items()}
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Invalid `eval.attacks`: {err}") from None


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
