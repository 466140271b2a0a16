"""The attack speed bench on a tiny trained run: both programs run the same attack on the same batch, the reference
loop makes the budgeted passes, the batched runs fewer programs, and the machine is recorded with the times."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from bench.attack_speed import main
from dad.attacks import AttackSpec
from dad.attacks.budget import budget_passes
from pipeline.stages import run_pipeline
from tests.conftest import TINY_ATTACK, tiny_config


def test_attack_speed_times_both_programs_on_the_same_batch(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    spec = AttackSpec(**{**TINY_ATTACK, "threat": "defense", "eot_samples": 3})
    cfg = replace(cfg, eval=replace(cfg.eval, attacks={"adaptive": spec}, mixed_attacks=["adaptive"],
                                    mixed_fractions=[0.5]))
    run_pipeline(cfg)
    result = main(["--run", str(tmp_path / "tiny"), "--threads", "1", "--results", str(tmp_path), "--name", "speed"])
    assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(result))
    assert set(result["attacks"]) == {"adaptive", "mixed_adaptive_0.5"}
    row = result["attacks"]["adaptive"]
    assert row["looped"]["passes"] == row["looped"]["programs"] == budget_passes(spec)
    assert row["batched"]["programs"] < row["batched"]["passes"] <= budget_passes(spec)
    assert all(0.0 <= row[mode]["dad"] <= 1.0 and row[mode]["seconds"] > 0 for mode in ("looped", "batched"))
    assert result["machine"]["cpu_model"] and result["threads"] == 1
    assert "| adaptive |" in (tmp_path / "speed.md").read_text()
