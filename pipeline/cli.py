"""The command-line entry points behind ``train.py`` and ``eval.py``.

User errors (bad configuration, missing data or checkpoints, incompatible files, bad input) end with
one line on stderr and exit code 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from dad.distributed import release_process_group
from pipeline.config import ConfigError, PipelineConfig, build_parser, config_from_namespace, prune_config
from pipeline.paths import STAGES
from pipeline.trainer import quiet_third_party

__all__ = ["main_train", "main_eval"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
STAGE_COMMANDS = (*STAGES, "pipeline")


def _user_errors() -> tuple[type[BaseException], ...]:
    from dad.defense import IncompatibleFileError, InvalidInputError
    from dad.detector import DetectorNotCalibratedError
    from datamodules.base import DataError
    from pipeline.checkpoints import StageCheckpointError

    return (ConfigError, DataError, StageCheckpointError, IncompatibleFileError, InvalidInputError,
            DetectorNotCalibratedError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError,
            ArgumentError)


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
    except _user_errors() as err:
        return _fail(err, debug)
    finally:
        release_process_group()  # a DDP run's process group, destroyed before the interpreter exits
    return 0


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()


def _has_config(argv: Sequence[str]) -> bool:
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
        parsers[name] = _stage_parser(not _has_config(argv))
        commands.add_subcommand(name, parsers[name], help=f"run the {name} stage" if name != "pipeline"
                                else "run every unfinished stage in order")
    debug = "--debug" in argv
    _configure_logging()
    try:
        ns = root.parse_args(list(argv))
    except ArgumentError as err:
        return _fail(err, debug)
    stage = ns.stage
    args = ns[stage]

    def run() -> None:
        from pipeline.stages import run_pipeline, run_stage

        cfg = config_from_namespace(parsers[stage], args)
        if stage == "pipeline":
            run_pipeline(cfg, args.ckpt_path if args.ckpt_path is not None else "last")
        else:
            run_stage(cfg, stage, args.ckpt_path)

    return _run_guarded(args.debug, run)


def _run_dir(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--run DIR`` (or ``--run=DIR``) and the other arguments."""
    for i, arg in enumerate(argv):
        if arg == "--run" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--run="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def main_eval(argv: Sequence[str]) -> int:
    """``eval.py --run runs/<name> [--eval.field ...]``: evaluate the saved defense and write the reports.

    The run's saved ``config.yaml`` is the base; flags override it (``--config FILE`` evaluates with a
    whole other configuration).
    """
    debug = "--debug" in argv
    run_dir, rest = _run_dir(list(argv))
    _configure_logging()
    holder: dict[str, PipelineConfig] = {}

    def parse() -> None:
        if run_dir is None and not _has_config(rest):
            raise ConfigError("Pass --run runs/<name> (a trained run) or --config <file.yaml>")
        saved = Path(run_dir) / "config.yaml" if run_dir is not None else None
        if saved is not None and not saved.is_file():
            raise FileNotFoundError(f"No {saved}: `--run` must be a run directory made by `train.py pipeline`")
        parser = build_parser(prog="eval.py", description="Evaluate a trained DAD run.")
        parser.add_argument("--debug", action="store_true", help="show full tracebacks")
        base = []
        if saved is not None:
            data, dropped = prune_config(yaml.safe_load(saved.read_text()) or {})
            if dropped:
                log.warning("%s was written by an earlier version: ignoring %s", saved, ", ".join(dropped))
            base = ["--config", yaml.safe_dump(data, sort_keys=False)]
        try:
            cfg = config_from_namespace(parser, parser.parse_args([*base, *rest]))
        except (ArgumentError, ConfigError) as err:
            hint = (f" ({saved} may predate this version: evaluate with `--config FILE`, e.g. a preset of configs/)"
                    if saved is not None else "")
            raise ConfigError(f"{' '.join(str(err).split())}{hint}") from None
        if run_dir is not None:
            cfg = replace(cfg, run=replace(cfg.run, root=str(Path(run_dir).parent), name=Path(run_dir).name))
        holder["cfg"] = cfg

    def run() -> None:
        parse()
        from evaluation.report import report_markdown
        from evaluation.runner import evaluate

        report = evaluate(holder["cfg"])
        print(report_markdown(report))

    return _run_guarded(debug, run)
