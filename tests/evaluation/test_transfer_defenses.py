"""Attacks through the defense crafted on another saved defense (``eval.transfer.defenses``): crafted on the
evaluated defense itself they are the attack itself, sample for sample; they count in the worst case and the report
names them."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evaluation.runner import evaluate
from pipeline.eval_settings import TransferSettings
from pipeline.paths import RunPaths
from pipeline.stages import run_pipeline
from tests.conftest import tiny_config


def test_attacks_crafted_on_a_copy_of_the_defense_are_the_attacks_themselves(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    cfg = replace(cfg, eval=replace(cfg.eval, max_test=50, max_test_defense=25, mixed_attacks=[], sanity_samples=25,
                                    sweep_factors=[0.5, 1.0]))
    run_pipeline(cfg)
    copy = tmp_path / "copy.pt"
    shutil.copy(RunPaths(cfg.run.dir).defense, copy)
    transfer = TransferSettings(defenses={"copy": str(copy)}, defense_attacks=["adaptive"])
    report = evaluate(replace(cfg, eval=replace(cfg.eval, transfer=transfer)))

    assert report["transfer"]["defense_attacks"] == ["transfer_copy_adaptive"]
    assert report["attacks"]["transfer_copy_adaptive"]["threat"] == "transfer"
    own, copied = report["robust_acc"]["adaptive"], report["robust_acc"]["transfer_copy_adaptive"]
    assert copied["n"] == own["n"] == 25 and copied["dad"] == own["dad"]
    states = {name: torch.load(cfg.run.dir / "eval_state" / f"{name}.pt", weights_only=True)["batches"]
              for name in ("adaptive", "transfer_copy_adaptive")}
    for batch, record in states["adaptive"].items():  # the same AEs, judged the same way
        for key in ("x_adv", "dad", "undefended"):
            assert torch.equal(states["transfer_copy_adaptive"][batch][key], record[key])
    samples = torch.load(cfg.run.dir / "report_samples.pt", weights_only=True)
    assert "transfer_copy_adaptive" in report["worst_case"]["linf eps=0.2"]["all_attacks"]["attacks"]
    assert samples["linf eps=0.2/all_attacks/samples"].numel() == 25
    assert "Transfer from other defenses" in (cfg.run.dir / "report.md").read_text()


def test_defense_transfer_settings_go_together() -> None:
    with pytest.raises(ValueError, match="go together"):
        TransferSettings(defenses={"copy": "x.pt"})
    with pytest.raises(ValueError, match="threat-defense"):
        replace(tiny_config(Path("unused")).eval, transfer=TransferSettings(defenses={"c": "x.pt"},
                                                                            defense_attacks=["pgd_linf"]))
