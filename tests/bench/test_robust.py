"""bench/robust.py --merge: saved per-method leaderboards become one table without rerunning anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench.robust as robust  # noqa: E402


def _result(method: str, threat: str = "linf eps=0.03137", config: str = "configs/cifar10_cpu_robust.yaml",
            threads: int = 1) -> dict[str, Any]:
    row = {"method": method, "clean_acc": 0.5, "clean_ci95": [0.4, 0.6], "autoattack": 0.1,
           "autoattack_ci95": [0.05, 0.15], "worst_case": 0.1, "worst_case_ci95": [0.05, 0.15], "worst_case_n": 500,
           "worst_case_source": "union", "training_seconds": 10.0, "backward_passes_per_sample": 11.0}
    return {"config": config, "threat": threat,
            "rows": [{**row, "setting": "alone", "clean_fpr": None},
                     {**row, "setting": "with DAD", "clean_fpr": 0.05}],
            "differences": [{"method": method, "threat": threat, "n": 500, "dad_minus_alone": -0.02,
                             "ci95": [-0.04, 0.0]}],
            "wall_seconds_this_invocation": {method: 100.0}, "machine": {"cpu": "x"}, "threads": threads,
            "command": f"python -m bench.robust --methods {method}"}


def test_merge_keeps_every_row_in_the_methods_order_and_each_source() -> None:
    merged = robust.merge([_result("standard"), _result("gairat", threads=2)], ["a", "b"])
    assert [(r["method"], r["setting"]) for r in merged["rows"]] == [
        ("standard", "alone"), ("standard", "with DAD"), ("gairat", "alone"), ("gairat", "with DAD")]
    assert [d["method"] for d in merged["differences"]] == ["standard", "gairat"]
    assert merged["wall_seconds_this_invocation"] == {"standard": 100.0, "gairat": 100.0}
    assert [(s["name"], s["threads"]) for s in merged["sources"]] == [("a", 1), ("b", 2)]
    again = robust.merge([merged, _result("trades")], ["ab", "c"])  # a method added to a merged leaderboard
    assert [d["method"] for d in again["differences"]] == ["standard", "trades", "gairat"]  # the usual order
    assert [(r["method"], r["setting"]) for r in again["rows"]][2:4] == [("trades", "alone"), ("trades", "with DAD")]
    assert [s["name"] for s in again["sources"]] == ["a", "b", "c"]
    table = robust.markdown(merged)
    assert "| standard | alone |" in table and "| GAIRAT | with DAD |" in table and "- GAIRAT: -2.0" in table


@pytest.mark.parametrize("other", [_result("fat", threat="l2 eps=0.5"), _result("fat", config="configs/x.yaml"),
                                   _result("standard")])
def test_merge_refuses_other_threats_configs_and_repeated_methods(other: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Cannot merge"):
        robust.merge([_result("standard"), other], ["a", "b"])


def test_merge_command_writes_json_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(robust, "RESULTS", tmp_path)
    for method in ("standard", "fat"):
        (tmp_path / f"lb_{method}.json").write_text(json.dumps(_result(method)))
    robust.main(["--merge", "lb_standard", "lb_fat", "--name", "lb"])
    assert [d["method"] for d in json.loads((tmp_path / "lb.json").read_text())["differences"]] == ["standard", "fat"]
    assert "| FAT | alone |" in (tmp_path / "lb.md").read_text()
    with pytest.raises(FileNotFoundError, match="lb_trades"):
        robust.main(["--merge", "lb_standard", "lb_trades", "--name", "lb"])
    with pytest.raises(SystemExit):
        robust.main(["--merge", "lb_standard"])  # no --name
    with pytest.raises(SystemExit):
        robust.main(["--methods", "fat"])  # no --config
