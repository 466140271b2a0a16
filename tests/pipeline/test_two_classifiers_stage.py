"""``defense.flagged_classifier`` on a tiny run: another run's classifier classifies what the routing flags, saved in
``defense.pt``, recorded in ``done.json`` and the report, and the evaluation attacks the defense through both
routes (evasion into the clean route, getting flagged into the second classifier's, BPDA through the switch)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dad.attacks import AttackSpec
from dad.defense_file import load_defense
from dad.purification import IdentityPurifier
from dad.route_selection import RouteSelectionSettings
from evaluation.runner import evaluate
from pipeline.checkpoints import StageCheckpointError
from pipeline.networks import load_classifier
from pipeline.paths import RunPaths
from pipeline.stages import run_pipeline, run_stage
from tests.conftest import TINY_ATTACK, tiny_config

_SWITCH = {"evade_clean": AttackSpec(**TINY_ATTACK, threat="defense", objective="evade_clean", lambdas=[10.0]),
           "evade_denoised": AttackSpec(**TINY_ATTACK, threat="defense", objective="evade_denoised", lambdas=[1.0]),
           "evade_bpda": AttackSpec(**TINY_ATTACK, threat="defense", objective="evade_bpda", lambdas=[0.0, 1.0])}


def test_a_second_runs_classifier_classifies_flagged_images_and_is_attacked(tmp_path: Path) -> None:
    second = tiny_config(tmp_path, "second")
    second = replace(second, run=replace(second.run, seed=1))
    run_stage(second, "classifier")  # only its classifier is needed
    checkpoint = RunPaths(second.run.dir).product("classifier")

    cfg = tiny_config(tmp_path)
    attacks = {**cfg.eval.attacks, **_SWITCH}
    behind = RouteSelectionSettings(routes=["identity"])  # one route: kept without measuring (no held-out split)
    cfg = replace(cfg, defense=replace(cfg.defense, flagged_classifier=str(checkpoint), select=behind),
                  eval=replace(cfg.eval, attacks=attacks, max_test=50, max_test_defense=25, mixed_attacks=[],
                               sanity_samples=25, sweep_factors=[0.5, 1.0]))
    summaries = run_pipeline(cfg)
    paths = RunPaths(cfg.run.dir)
    assert summaries["defense"]["flagged_classifier"] == str(checkpoint)
    defense = load_defense(paths.defense)
    expected = load_classifier(checkpoint, "").state_dict()
    assert defense.flagged_classifier is not None and defense.route_classifier is defense.flagged_classifier
    for key, value in defense.flagged_classifier.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert defense.classifier is not defense.flagged_classifier
    assert isinstance(defense.purifier, IdentityPurifier) and defense.route_selection is None
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    defense.routing = "always"  # the second classifier alone
    with torch.no_grad():
        torch.testing.assert_close(defense(x), defense.flagged_classifier(x))

    report = evaluate(cfg)
    assert report["flagged_classifier"] == defense.specs["flagged_classifier"]
    assert set(_SWITCH) <= set(report["robust_acc"])
    assert "a second classifier (`small_cnn`) classifies flagged images" in (paths.root / "report.md").read_text()

    paths.done("defense").unlink()
    missing = replace(cfg, defense=replace(cfg.defense, flagged_classifier=str(tmp_path / "nope.ckpt")))
    with pytest.raises(StageCheckpointError, match="No classifier checkpoint at .*nope.ckpt$"):
        run_stage(missing, "defense")
    with pytest.raises(ValueError, match="flagged_classifier"):
        replace(cfg.defense, flagged_classifier="")
