"""bench/robust.py --route-rows on a tiny run: the sibling runs share the backbone, the published route's AEs are
transferred, and the selected row follows the defense stage's choice."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import lightning_modules.evaluator as evaluator_module
from bench.route_rows import route_method, run_route_method
from dad.attacks import AttackSpec
from dad.route_selection import RouteSelectionSettings
from pipeline.config import ConfigError
from pipeline.paths import RunPaths
from tests.conftest import TINY_ATTACK, tiny_config


def _config(root: Path):  # type: ignore[no-untyped-def]
    cfg = tiny_config(root, name="lb_route_standard")
    attacks = {"pgd_linf": AttackSpec(**TINY_ATTACK),
               "autoattack_rand": AttackSpec(**TINY_ATTACK, threat="defense", eot_samples=2)}
    evaluation = replace(cfg.eval, attacks=attacks, max_test=40, max_test_defense=25, mixed_attacks=[],
                         sanity_samples=25, sweep_factors=[0.5, 1.0])
    return replace(cfg, data=replace(cfg.data, selection_size=50), eval=evaluation,
                   denoiser=replace(cfg.denoiser, adv_steps=1, adv_eps=0.2, adv_step_size=0.1),
                   defense=replace(cfg.defense, select=RouteSelectionSettings(routes=["denoiser", "identity"])))


def _same(row: dict, other: dict) -> bool:  # type: ignore[type-arg]
    return all(row[k] == other[k] for k in ("clean_acc", "autoattack", "worst_case", "worst_case_n"))


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list[tuple[object, ...]]]:
    """The route rows of a tiny run (routes ``[denoiser, identity]``), with every classifier-only attack crafted."""
    root = tmp_path_factory.mktemp("route")
    crafted: list[tuple[object, ...]] = []
    real = evaluator_module.run_seeded

    def counting(spec, *args, **kwargs):  # type: ignore[no-untyped-def]
        if spec.threat == "classifier":
            crafted.append((spec.eps, spec.steps, kwargs["chunk"]))
        return real(spec, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluator_module, "run_seeded", counting)
        result = route_method(_config(root), "standard", None, "pgd_linf")
    return root, result, crafted


def test_route_rows_share_the_backbone_transfer_the_published_route_and_follow_the_choice(
        routed: tuple[Path, Any, list[tuple[object, ...]]]) -> None:
    root, (rows, difference), crafted = routed
    # the classifier-only AEs (pgd_linf on 2 batches, its eps sweep) are crafted once for the backbone's and the
    # defense's evaluations: the second judges them
    assert len(crafted) >= 2 and len(set(crafted)) == len(crafted)
    run, published = root / "lb_route_standard", root / "lb_route_standard_published"
    assert [r["setting"] for r in rows] == ["alone", "with DAD, route-trained denoiser", "with DAD, selected route"]
    for product in ("classifier/done.json", "kernel/done.json", "splits.json"):  # copied, never retrained
        assert (published / product).read_bytes() == (run / product).read_bytes()
    assert "adv_steps: 0" in (published / "config.yaml").read_text()
    chosen = json.loads(RunPaths(run).done("defense").read_text())["route_selection"]["chosen"]
    route_run = run if chosen == "denoiser" else root / "lb_route_standard_routekept"
    report = json.loads((route_run / "report.json").read_text())
    assert "transfer_published_autoattack_rand" in report["robust_acc"]  # the masking check
    alone, trained, selected = rows
    assert selected["route"] == chosen and set(selected["route_validation"]) == {"denoiser", "identity"}
    assert _same(selected, trained if chosen == "denoiser" else alone)
    assert selected["measured"] == (chosen == "denoiser") and selected["clean_fpr"] == trained["clean_fpr"]


def test_the_backbone_alone_evaluated_in_a_second_process_gives_the_same_rows(
        routed: tuple[Path, Any, list[tuple[object, ...]]], tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    rows, _ = route_method(cfg, "standard", None, "pgd_linf", parallel=True)
    assert (cfg.run.dir / "report_never.json").is_file()
    for one, other in zip(routed[1][0], rows):
        assert _same(one, other) and one["clean_fpr"] == other["clean_fpr"]
    for sibling in ("published", "routekept"):  # one store of classifier-only AEs, linked
        run = tmp_path / f"lb_route_standard_{sibling}"
        if run.is_dir():
            store = run / "crafted_aes"
            assert store.is_symlink() and store.resolve() == (cfg.run.dir / "crafted_aes").resolve()


@pytest.fixture(scope="module")
def three_routes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run whose selection also had the published denoiser as a candidate."""
    root = tmp_path_factory.mktemp("three")
    run_route_method(_config(root), select_published=True)
    return root


@pytest.mark.parametrize("chosen", ["denoiser", "identity", "published"])
def test_the_selected_row_follows_the_recorded_choice(three_routes: Path, tmp_path: Path, chosen: str) -> None:
    """With the published denoiser among the candidates, whatever the defense stage recorded as its choice: the
    route-trained denoiser (that row), the backbone (its numbers, not re-measured) or the published one (the run's
    defense evaluated)."""
    shutil.copytree(three_routes, tmp_path, symlinks=True, dirs_exist_ok=True)
    cfg = _config(tmp_path)
    done = RunPaths(cfg.run.dir).done("defense")
    summary = json.loads(done.read_text())
    assert set(summary["route_selection"]["routes"]) == {"denoiser", "identity", "published"}
    summary["route_selection"]["chosen"] = chosen
    done.write_text(json.dumps(summary))
    (alone, trained, selected), difference = route_method(cfg, "standard", None, "pgd_linf", select_published=True)
    assert selected["route"] == chosen and selected["measured"] == (chosen != "identity")
    assert chosen == "denoiser" or (tmp_path / "lb_route_standard_routekept" / "report.json").is_file()
    if chosen == "denoiser":
        assert _same(selected, trained) and difference["selected_minus_alone"] == difference["dad_minus_alone"]
    elif chosen == "identity":
        assert _same(selected, alone) and difference["selected_ci95"] == [0.0, 0.0]
    else:
        report = json.loads((cfg.run.dir / "report.json").read_text())
        assert selected["worst_case"] == report["worst_case"]["linf eps=0.2"]["headline"]["dad"]


def test_route_rows_need_a_selection_that_includes_the_route_trained_denoiser(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="--route-rows"):
        route_method(cfg, "standard", None, "pgd_linf")
