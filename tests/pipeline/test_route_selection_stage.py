"""The defense stage's choice of route on a tiny run: measured on the selection split, kept in ``defense.pt``,
``done.json`` and the report, and the kept purifier is the chosen one after save and load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from dad.defense_file import load_defense
from dad.purification import DenoiserPurifier, IdentityPurifier
from dad.route_selection import RouteSelectionSettings
from evaluation.runner import evaluate
from pipeline.config import ConfigError
from pipeline.paths import RunPaths
from pipeline.stages import run_pipeline
from tests.conftest import tiny_config


def _config(root: Path):  # type: ignore[no-untyped-def]
    cfg = tiny_config(root)
    select = RouteSelectionSettings(routes=["denoiser", "identity"])  # every attack through the defense: `adaptive`
    evaluation = replace(cfg.eval, max_test=50, max_test_defense=25, mixed_attacks=[], sanity_samples=25,
                         sweep_factors=[0.5, 1.0])
    return replace(cfg, data=replace(cfg.data, selection_size=50), defense=replace(cfg.defense, select=select),
                   eval=evaluation)


def test_selection_needs_its_own_held_out_images(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="selection_size"):
        replace(cfg, defense=replace(cfg.defense, select=RouteSelectionSettings(routes=["denoiser", "identity"],
                                                                                attacks=["adaptive"])))


def test_the_stage_keeps_the_route_it_measured_best_and_says_so_everywhere(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    summaries = run_pipeline(cfg)
    paths = RunPaths(cfg.run.dir)
    splits = json.loads((paths.root / "splits.json").read_text())
    held_out = set(splits["selection"])
    assert len(held_out) == 50 and not held_out & set(splits["val"] + splits["calibration"] + splits["denoiser"])
    record = summaries["defense"]["route_selection"]
    assert record == json.loads(paths.done("defense").read_text())["route_selection"]
    assert set(record["routes"]) == {"denoiser", "identity"} and record["attacks"] == ["adaptive"]
    routes = record["routes"]
    best = max(r["worst_case"] for r in routes.values())
    assert routes[record["chosen"]]["tied"] and all(r["n"] == 50 for r in routes.values())
    assert all(r["tied"] == (r["vs_best"][1] <= 0 <= r["vs_best"][2]) for r in routes.values())
    assert best - routes[record["chosen"]]["worst_case"] <= routes[record["chosen"]]["vs_best"][2] - \
        routes[record["chosen"]]["vs_best"][1]
    defense = load_defense(paths.defense)
    kinds = {"denoiser": DenoiserPurifier, "identity": IdentityPurifier}
    assert isinstance(defense.purifier, kinds[record["chosen"]]) and defense.route_selection == record
    resaved = tmp_path / "again.pt"
    defense.save(resaved)
    assert load_defense(resaved).route_selection == record
    report = evaluate(cfg)
    assert report["route_selection"] == record
    assert f"route `{record['chosen']}` kept by the defense stage" in (paths.root / "report.md").read_text()


def test_another_runs_denoiser_is_a_candidate_measured_like_the_others(tmp_path: Path) -> None:
    """``defense.select.denoisers`` adds a denoiser stage's checkpoint as a route; given this run's own, it is
    measured exactly as the run's denoiser (same weights, same seeds)."""
    cfg = _config(tmp_path)
    run_pipeline(cfg)
    paths = RunPaths(cfg.run.dir)
    paths.done("defense").unlink()  # the defense stage again, with three candidates
    select = replace(cfg.defense.select, routes=["denoiser", "identity", "copy"],
                     denoisers={"copy": str(paths.product("denoiser"))})
    record = run_pipeline(replace(cfg, defense=replace(cfg.defense, select=select)))["defense"]["route_selection"]
    assert set(record["routes"]) == {"denoiser", "identity", "copy"}
    for key in ("worst_case", "attacks", "classifier_only"):
        assert record["routes"]["copy"][key] == record["routes"]["denoiser"][key]
    with pytest.raises(ValueError, match="built-in routes"):
        replace(select, denoisers={"identity": "x"})
