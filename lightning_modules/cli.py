"""The command-line entry points behind ``train.py`` and ``eval.py``.

User errors (bad configuration, missing data or checkpoints, incompatible files, bad input) end with
one line on stderr and exit code 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from lightning_modules.config import (
    ConfigError, PipelineConfig, add_config_arguments, config_from_namespace,
)

__all__ = ["main_train", "main_eval"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
STAGE_COMMANDS = ("classifier", "kernel", "denoiser", "defense", "pipeline")


def _user_errors() -> tuple[type[BaseException], ...]:
    from dad.defense import IncompatibleFileError, InvalidInputError
    from dad.detector import DetectorNotCalibratedError
    from datamodules.base import DataError
    from lightning_modules.checkpoints import StageCheckpointError

    return (ConfigError, DataError, StageCheckpointError, IncompatibleFileError, InvalidInputError,
            DetectorNotCalibratedError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError)



def _fail(err: BaseException, debug: bool) -> int:
    """Print ``error: <one line>`` (or re-raise with ``--debug``) and return the exit code 2."""
    if debug:
        raise err
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2


def _run_guarded(debug: bool, fn: Callable[[], Any]) -> int:
    try:
        fn()
    except (*_user_errors(), ArgumentError) as err:
        return _fail(err, debug)
    return 0


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _stage_parser(with_default_config: bool) -> ArgumentParser:
    # configs/digits.yaml is the default only when no --config is given: a config file is layered on the
    # dataclass defaults, never on the digits values
    default_files = [str(DEFAULT_CONFIG)] if with_default_config and DEFAULT_CONFIG.is_file() else []
    parser = ArgumentParser(default_config_files=default_files, exit_on_error=False)
    add_config_arguments(parser)
    parser.add_argument("--ckpt_path", type=str | None, default=None,
                        help="'last' resumes the stage from its last checkpoint, or a checkpoint path")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def main_train(argv: Sequence[str]) -> int:
    """``train.py {classifier,kernel,denoiser,defense,pipeline} [--config ...] [--section.field ...]``."""
    root = ArgumentParser(prog="train.py", description="Train DAD: one stage or the whole pipeline.",
                          exit_on_error=False)
    commands = root.add_subcommands(dest="stage")
    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    for name in STAGE_COMMANDS:
        commands.add_subcommand(name, _stage_parser(not has_config), help=f"run the {name} stage" if name != "pipeline"
                                else "run every unfinished stage in order")
    debug = "--debug" in argv
    try:
        ns = root.parse_args(list(argv))
    except ArgumentError as err:
        return _fail(err, debug)
    stage = ns.stage
    args = ns[stage]
    _configure_logging()

    def run() -> None:
        from lightning_modules.pipeline import run_pipeline, run_stage

        cfg = config_from_namespace(args)
        if stage == "pipeline":
            run_pipeline(cfg, args.ckpt_path if args.ckpt_path is not None else "last")
        else:
            run_stage(cfg, stage, args.ckpt_path)

    return _run_guarded(args.debug, run)


def _saved_sections(run_dir: str) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"No {path}: `--run` must be a run directory made by `train.py pipeline`")
    return yaml.safe_load(path.read_text()) or {}


def main_eval(argv: Sequence[str]) -> int:
    """``eval.py --run runs/<name> [--eval.field ...]``: evaluate the saved defense and write the reports."""
    argv = list(argv)
    debug = "--debug" in argv
    run_dir = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--run"), None)
    run_dir = run_dir or next((a.split("=", 1)[1] for a in argv if a.startswith("--run=")), None)
    _configure_logging()
    holder: dict[str, PipelineConfig] = {}

    def parse() -> None:
        parser = ArgumentParser(prog="eval.py", description="Evaluate a trained DAD run.", exit_on_error=False)
        add_config_arguments(parser)
        parser.add_argument("--debug", action="store_true", help="show full tracebacks")
        rest = argv
        if run_dir is not None:
            saved = _saved_sections(run_dir)
            parser.set_defaults(saved)
            rest = [a for i, a in enumerate(argv) if a != "--run" and not a.startswith("--run=")
                    and not (i > 0 and argv[i - 1] == "--run")]
        elif not any(a == "--config" or a.startswith("--config=") for a in argv):
            raise ConfigError("Pass --run runs/<name> (a trained run) or --config <file.yaml>")
        ns = parser.parse_args(rest)
        cfg = config_from_namespace(ns)
        if run_dir is not None:
            cfg.run.root, cfg.run.name = str(Path(run_dir).parent), Path(run_dir).name
        holder["cfg"] = cfg

    def run() -> None:
        parse()
        from lightning_modules.evaluation import evaluate, report_markdown

        report = evaluate(holder["cfg"])
        print(report_markdown(report))

    return _run_guarded(debug, run)
