"""The run configuration: one typed section per stage, each defined once beside the code that consumes it.

``run`` is defined here, ``defense`` in :mod:`pipeline.defense_settings`; ``data`` is
:class:`~datamodules.settings.DataSettings`, ``classifier``/``kernel``/``denoiser``/``score`` the settings of their
LightningModules, ``purifier`` the diffusion purifiers' (:class:`~dad.diffusion.selection.PurifierSettings`),
``attack`` (the training AEs) an :class:`~dad.attacks.AttackSpec`, ``eval``
:class:`~pipeline.eval_settings.EvalSettings`, and ``trainer`` any argument of ``pytorch_lightning.Trainer`` (read
from its signature). Every option has one name, one default and one check (the section's ``__post_init__``).
Parsing uses jsonargparse, the library behind LightningCLI.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from dad.attacks import AttackSpec
from dad.diffusion.selection import PurifierSettings
from datamodules.settings import DataSettings
from pipeline.defense_settings import DefenseSettings
from pipeline.eval_settings import EvalSettings
from lightning_modules.classifier import ClassifierSettings
from lightning_modules.denoiser import DenoiserSettings
from lightning_modules.kernel import KernelSettings
from lightning_modules.score import ScoreSettings
from pipeline.config_compat import moved_option_hint

__all__ = [
    "RunSettings", "DefenseSettings", "PipelineConfig", "ConfigError", "OWNED_TRAINER_ARGS", "build_parser",
    "add_trainer_arguments", "trainer_parser", "normalize_trainer", "config_from_namespace", "from_plain",
    "dump_config", "load_config", "parse_config", "known_options",
]


class ConfigError(ValueError):
    """An invalid configuration value."""


@dataclass(frozen=True)
class RunSettings:
    """Where the run lives, ``<root>/<name>/``; ``seed`` seeds every stage; ``last.ckpt`` is written every
    ``checkpoint_every_n_steps`` training steps (None: at the end of every epoch); ``channels_last``: the training
    stages' built-in networks in channels-last memory format (None: on a CPU only, where a CIFAR ResNet-18 training
    step ran 1.3-1.5x faster; :class:`callbacks.ChannelsLast`)."""

    name: str = "default"
    root: str = "runs"
    seed: int = 0
    checkpoint_every_n_steps: int | None = None
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"Expected a plain `run.name`, got {self.name!r}")
        if self.checkpoint_every_n_steps is not None and self.checkpoint_every_n_steps < 1:
            raise ConfigError(f"Expected `run.checkpoint_every_n_steps` >= 1, got {self.checkpoint_every_n_steps}")

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


OWNED_TRAINER_ARGS: dict[str, str] = {
    "max_epochs": "`classifier.epochs`, `denoiser.epochs` and `score.epochs`",
    "min_epochs": "`classifier.epochs`, `denoiser.epochs` and `score.epochs`",
    "max_steps": "`kernel.steps`",
    "min_steps": "`kernel.steps`",
    "default_root_dir": "`run.root` and `run.name`",
    "enable_checkpointing": "`run.checkpoint_every_n_steps` (every stage writes last.ckpt)",
    "use_distributed_sampler": "nothing: the data modules shard by rank themselves",
    "inference_mode": "nothing: attacks need gradients during evaluation",
}
"""Trainer arguments the pipeline sets per stage, and the option that controls each instead."""

_TRAINER_ARGS = frozenset(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


@dataclass(frozen=True)
class PipelineConfig:
    """The whole run: every section, validated together where they depend on each other."""

    run: RunSettings = field(default_factory=RunSettings)
    data: DataSettings = field(default_factory=DataSettings)
    trainer: dict[str, Any] = field(default_factory=dict)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    attack: AttackSpec = field(default_factory=lambda: AttackSpec(name="mma"))
    kernel: KernelSettings = field(default_factory=KernelSettings)
    denoiser: DenoiserSettings = field(default_factory=DenoiserSettings)
    defense: DefenseSettings = field(default_factory=DefenseSettings)
    score: ScoreSettings = field(default_factory=ScoreSettings)
    purifier: PurifierSettings = field(default_factory=PurifierSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trainer", normalize_trainer(self.trainer))
        if self.attack.threat != "classifier":
            raise ConfigError(f"The training AEs attack the classifier: expected `attack.threat` classifier, "
                              f"got {self.attack.threat!r}")
        if self.defense.reference_size < self.defense.batch_size:
            raise ConfigError(
                f"The reference set ({self.defense.reference_size}) must be at least as large as the inference "
                f"batch ({self.defense.batch_size}): raise `defense.reference_size` or lower `defense.batch_size`")
        top = self.purifier.largest_timestep
        if self.purifier.kinds and self.score.t_max is not None and top > self.score.t_max:
            raise ConfigError(f"The purifiers reach timestep {top:g} (`purifier.t_star_grid` + `purifier.bias_grid`) "
                              f"but the score model trains up to `score.t_max`={self.score.t_max}: raise it")
        try:
            self.defense.select.check(self.eval.attacks, self.data.selection_size, self.purifier.kinds)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for name, spec in self.eval.attacks.items():
            if spec.batch_size not in (None, self.defense.batch_size):
                raise ConfigError(f"`eval.attacks.{name}.batch_size` is {spec.batch_size}: attacks run on the "
                                  f"defense's batches, so leave it unset (or set `defense.batch_size`)")


def normalize_trainer(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """Check the ``trainer`` section against the Trainer's signature and complete its class specs.

    Keeps the given arguments only, each as the parser reads it (a callback's ``init_args`` with their
    defaults filled in), so a configuration built in code equals the same one read back from YAML.
    """
    for name in trainer:
        if name in OWNED_TRAINER_ARGS:
            raise ConfigError(f"`trainer.{name}` is set by the pipeline per stage: use {OWNED_TRAINER_ARGS[name]}")
        if name not in _TRAINER_ARGS:
            raise ConfigError(f"Unknown Trainer argument `trainer.{name}`")
    if not trainer:
        return {}
    try:
        parsed = trainer_parser().parse_object({"trainer": _plain(dict(trainer))})
    except Exception as err:  # jsonargparse reports type errors in several exception types
        raise ConfigError(f"Invalid `trainer`: {' '.join(str(err).split())}") from None
    return {name: _plain(parsed.trainer[name]) for name in trainer}


@functools.cache
def trainer_parser() -> ArgumentParser:
    """A parser of the ``trainer`` section alone (built once)."""
    parser = ArgumentParser(exit_on_error=False)
    add_trainer_arguments(parser)
    return parser


_SECTIONS = {f.name: f for f in fields(PipelineConfig)}
_SECTION_TYPES = typing.get_type_hints(PipelineConfig)


def add_trainer_arguments(parser: ArgumentParser) -> None:
    """``--trainer.*``: every ``pytorch_lightning.Trainer`` argument, from its signature."""
    parser.add_class_arguments(pl.Trainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True)


def build_parser(**kwargs: Any) -> ArgumentParser:
    """A parser with ``--config`` and one ``--<section>.<field>`` flag per option (``kwargs`` go to the parser)."""
    parser = ArgumentParser(exit_on_error=False, **kwargs)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML configuration file")
    for name, f in _SECTIONS.items():
        if name == "trainer":
            add_trainer_arguments(parser)
        else:
            parser.add_argument(f"--{name}", type=_SECTION_TYPES[name], default=f.default_factory())
    return parser


def _plain(value: Any) -> Any:
    """Namespaces and dataclasses as nested dicts and lists of plain values."""
    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_plain(cls: type, value: Any, label: str) -> Any:
    """Build the dataclass ``cls`` from a mapping (nested sections and ``dict[str, dataclass]`` fields too).

    Errors become one-line :class:`ConfigError` naming ``label`` (the option's dotted path).
    """
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"Expected a mapping for `{label}`, got {value!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(f"Unknown option(s) {unknown} in `{label}`; expected some of {sorted(names)}")
    kwargs = {}
    for name, item in value.items():
        kind = hints[name]
        if is_dataclass(kind):
            item = from_plain(kind, item, f"{label}.{name}")
        elif typing.get_origin(kind) is dict and is_dataclass(typing.get_args(kind)[1]):
            inner = typing.get_args(kind)[1]
            item = {k: from_plain(inner, v, f"{label}.{name}.{k}") for k, v in (item or {}).items()}
        kwargs[name] = item
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        message = " ".join(str(err).split())
        raise ConfigError(message if f"`{label}" in message else f"Invalid `{label}`: {message}") from None


def _trainer_overrides(parser: ArgumentParser, trainer: Namespace) -> dict[str, Any]:
    """The Trainer arguments that differ from Lightning's defaults (what the run's config records)."""
    defaults = parser.get_defaults().trainer
    return {k: _plain(v) for k, v in vars(trainer).items() if _plain(v) != _plain(getattr(defaults, k, None))}


def config_from_namespace(parser: ArgumentParser, ns: Namespace) -> PipelineConfig:
    """Build and validate the :class:`PipelineConfig` from arguments parsed by ``parser``."""
    sections: dict[str, Any] = {"trainer": _trainer_overrides(parser, ns.trainer)}
    for name in _SECTIONS:
        if name != "trainer":
            sections[name] = from_plain(_SECTION_TYPES[name], _plain(ns[name]), name)
    return PipelineConfig(**sections)


def known_options(section: str) -> frozenset[str] | None:
    """The option names of ``section`` (None: a section of free-form values); ``KeyError`` for an unknown one."""
    kind = _SECTION_TYPES[section]
    return _TRAINER_ARGS if section == "trainer" else frozenset(f.name for f in fields(kind)) if is_dataclass(
        kind) else None


def dump_config(cfg: PipelineConfig) -> str:
    """The configuration as YAML (what ``runs/<name>/config.yaml`` holds); :func:`load_config` reads it back."""
    return yaml.safe_dump(_plain(cfg), sort_keys=False)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a YAML configuration file (a run's saved ``config.yaml`` or a preset), with ``--<section>.<option>
    VALUE`` ``overrides`` on top, parsed as ``train.py`` parses its command line."""
    return parse_config(["--config", str(path), *overrides])


def parse_config(args: Sequence[str]) -> PipelineConfig:
    """The configuration ``train.py``'s command line ``args`` give (``--config`` a file or YAML text); an unknown or
    moved option is a :class:`ConfigError` naming it."""
    parser = build_parser()
    try:
        namespace = parser.parse_args(list(args))
    except ArgumentError as err:
        raise ConfigError(moved_option_hint(" ".join(str(err).split()))) from None
    return config_from_namespace(parser, namespace)
