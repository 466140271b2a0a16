"""With a fixed seed and deterministic mode on the CPU, two pipeline runs give identical reports."""

from __future__ import annotations

from dataclasses import replace

from evaluation.runner import evaluate
from pipeline.stages import run_pipeline
from tests.conftest import tiny_config


def _report(root, name):  # type: ignore[no-untyped-def]
    cfg = tiny_config(root, name)
    cfg = replace(cfg, trainer={**cfg.trainer, "deterministic": True})
    run_pipeline(cfg)
    report = evaluate(cfg)
    report.pop("timings_s")
    return report


def test_two_runs_give_identical_reports(tmp_path):
    first = _report(tmp_path, "one")
    second = _report(tmp_path, "two")
    assert first == second
    assert 0.0 < first["clean_acc"]["undefended"] <= 1.0
