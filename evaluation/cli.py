"""The command line behind ``eval.py``: evaluate a trained run's saved defense and write its reports.

User errors end with one line on stderr and exit code 2, as ``train.py``'s do (:func:`pipeline.cli.run_guarded`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from jsonargparse import ArgumentError

from evaluation.report import report_markdown
from evaluation.runner import evaluate
from pipeline.cli import configure_logging, has_config, run_guarded
from pipeline.config import ConfigError, PipelineConfig, build_parser, config_from_namespace
from pipeline.saved_config import saved_config_text

__all__ = ["main_eval"]


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
    configure_logging()
    holder: dict[str, PipelineConfig] = {}

    def parse() -> None:
        if run_dir is None and not has_config(rest):
            raise ConfigError("Pass --run runs/<name> (a trained run) or --config <file.yaml>")
        saved = Path(run_dir) / "config.yaml" if run_dir is not None else None
        if saved is not None and not saved.is_file():
            raise FileNotFoundError(f"No {saved}: `--run` must be a run directory made by `train.py pipeline`")
        parser = build_parser(prog="eval.py", description="Evaluate a trained DAD run.")
        parser.add_argument("--debug", action="store_true", help="show full tracebacks")
        base = []
        if saved is not None:
            base = ["--config", saved_config_text(saved)]
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
        report = evaluate(holder["cfg"])
        print(report_markdown(report))

    return run_guarded(debug, run)
