"""The command line behind ``train.py``, and what ``eval.py``'s (:mod:`evaluation.cli`) shares with it.

User errors (bad configuration, missing data or checkpoints, incompatible files, bad input) end with
one line on stderr and exit code 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser

from dad.distributed import release_process_group
from pipeline.config import ConfigError, build_parser, config_from_namespace
from pipeline.config_compat import moved_option_hint
from pipeline.paths import STAGES
from pipeline.trainer import quiet_third_party

__all__ = ["main_train", "run_guarded", "configure_logging", "has_config", "fail"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
STAGE_COMMANDS = (*STAGES, "pipeline")


def _user_errors() -> tuple[type[BaseException], ...]:
    from dad.defense import InvalidInputError
    from dad.io import IncompatibleFileError
    from dad.detector import DetectorNotCalibratedError
    from datamodules.base import DataError
    from pipeline.checkpoints import StageCheckpointError

    return (ConfigError, DataError, StageCheckpointError, IncompatibleFileError, InvalidInputError,
            DetectorNotCalibratedError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError,
            ArgumentError)


def fail(err: BaseException, debug: bool) -> int:
    """Print ``error: <one line>`` (or re-raise with ``--debug``) and return the exit code 2."""
    if debug:
        raise err
    message = moved_option_hint(" ".join(str(err).split()) or type(err).__name__)
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_guarded(debug: bool, fn: Callable[[], Any]) -> int:
    try:
        fn()
    except _user_errors() as err:
        return fail(err, debug)
    finally:
        release_process_group()  # a DDP run's process group, destroyed before the interpreter exits
    return 0


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()


def has_config(argv: Sequence[str]) -> bool:
    return any(a == "--config" or a.startswith("--config=") for a in argv)


def _stage_parser(with_default_config: bool) -> ArgumentParser:
    # configs/digits.yaml is the default only when no --config is given: a config file is layered on the
    # dataclass defaults, never on the digits values
    default_files = [str(DEFAULT_CONFIG)] if with_default_config and DEFAULT_CONFIG.is_file() else []
    parser = build_parser(default_config_files=default_files)
    parser.add_argument("--ckpt_path", type=str | None, default=None,
                        help="'last' resumes the stage from its last checkpoint, or a checkpoint path")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def main_train(argv: Sequence[str]) -> int:
    """``train.py <stage>|pipeline [--config ...] [--section.field ...]``, a stage of :data:`~pipeline.paths.STAGES`."""
    root = ArgumentParser(prog="train.py", description="Train DAD: one stage or the whole pipeline.",
                          exit_on_error=False)
    commands = root.add_subcommands(dest="stage")
    parsers = {}
    for name in STAGE_COMMANDS:
        parsers[name] = _stage_parser(not has_config(argv))
        commands.add_subcommand(name, parsers[name], help=f"run the {name} stage" if name != "pipeline"
                                else "run every unfinished stage in order")
    debug = "--debug" in argv
    configure_logging()
    try:
        ns = root.parse_args(list(argv))
    except ArgumentError as err:
        return fail(err, debug)
    stage = ns.stage
    args = ns[stage]

    def run() -> None:
        from pipeline.stages import run_pipeline, run_stage

        cfg = config_from_namespace(parsers[stage], args)
        if stage == "pipeline":
            run_pipeline(cfg, args.ckpt_path if args.ckpt_path is not None else "last")
        else:
            run_stage(cfg, stage, args.ckpt_path)

    return run_guarded(args.debug, run)
