"""eval.py's evaluation on a tiny trained run: report schema, plots, per-attack state and resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import dad.attacks.common as attack_common
import lightning_modules.evaluator as evaluator_module
from bench.robust import leaderboard_rows
from dad.attacks import AttackSpec
from evaluation.attacking import transfer_source
from evaluation.context import open_context
from evaluation.runner import evaluate
from pipeline.eval_settings import TransferSettings
from evaluation.state import AttackState
from pipeline.config import PipelineConfig
from pipeline.stages import run_pipeline
from tests.conftest import TINY_ATTACK, tiny_config

ATTACKS = {
    "pgd_linf": {**TINY_ATTACK, "threat": "classifier"},
    "adaptive": {**TINY_ATTACK, "threat": "defense", "eot_samples": 2},
    "evade_clean": {**TINY_ATTACK, "threat": "defense", "objective": "evade_clean", "lambdas": [1.0, 10.0]},
    "autoattack_rand": {"name": "apgd", "threat": "defense", "loss": "ce+dlr", "norm": "linf", "eps": 0.2,
                        "steps": 2, "eot_samples": 2},
}
REPORT_KEYS = {"attacks", "clean_acc", "defense_file", "detection", "draws", "mixed", "num_classes", "num_test",
               "num_test_defense", "plots", "purifier", "robust_acc", "routing", "sanity", "sweep", "timings_s",
               "transfer", "variant", "worst_case"}
"""The report's keys before the attacks' runs were batched (commit cb734c1): all kept; ``attack_cost`` and
``route_selection`` (the defense stage's choice of route) added."""
ENTRY_KEYS = {"robust_acc": {"dad", "dad_ci95", "dad_mean", "dad_minus_undefended", "denoised", "n", "undefended",
                             "undefended_ci95"},
              "mixed": {"attack", "dad", "dad_ci95", "dad_mean", "detection_rate", "filler_acc", "fraction", "n",
                        "threat"},
              "worst_case": {"all_attacks", "classifier_only", "eps", "folded", "headline", "headline_whole_batch",
                             "mixed", "norm", "white_box"}}
SANITY = {"gradients", "randomness_eot", "white_box_stronger", "eps_monotone", "large_eps_near_chance", "more_steps",
          "more_eot", "restarts", "more_draws", "fpr"}


def _config(root: Path, **attack_changes: dict[str, Any]) -> PipelineConfig:
    cfg = tiny_config(root)
    attacks = {name: AttackSpec(**{**spec, **attack_changes.get(name, {})}) for name, spec in ATTACKS.items()}
    evaluation = replace(cfg.eval, attacks=attacks, transfer=TransferSettings(attacks=["pgd_linf"], epochs=1),
                         sanity_attack="adaptive", sanity_samples=25, sweep_factors=[0.5, 1.0, 2.5],
                         mixed_attacks=["pgd_linf", "evade_clean"], mixed_fractions=[0.1, 0.5],
                         max_test=75, max_test_defense=50)  # classifier-only attacks see 75 images, attacks through
    # the defense 50; the clean FPR is measured on all 100
    return replace(cfg, eval=evaluation, data=replace(cfg.data, calibration_size=150))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("eval")
    cfg = _config(root)
    run_pipeline(cfg)
    return root, evaluate(cfg)


def _copy(evaluated: tuple[Path, dict[str, Any]], tmp_path: Path) -> PipelineConfig:
    shutil.copytree(evaluated[0], tmp_path, dirs_exist_ok=True)
    return _config(tmp_path)


def test_report_keys_are_kept_and_the_attack_cost_is_reported(evaluated: tuple[Path, dict[str, Any]]) -> None:
    report = evaluated[1]
    # None where no route was chosen, where no second classifier classifies flagged images
    assert set(report) == REPORT_KEYS | {"attack_cost", "route_selection", "flagged_classifier"}
    for section, keys in ENTRY_KEYS.items():
        assert all(set(entry) == keys for entry in report[section].values()), section
    through = {"adaptive", "evade_clean", "autoattack_rand", "mixed_evade_clean_0.1", "mixed_evade_clean_0.5"}
    assert set(report["attack_cost"]) == through
    for name, cost in report["attack_cost"].items():
        assert 0 < cost["programs"] <= cost["passes"] <= cost["budget_passes"], name  # early stops spend less
        assert 0.0 <= cost["stopped_early"] <= 1.0
    assert report["attack_cost"]["adaptive"]["programs"] < report["attack_cost"]["adaptive"]["passes"]  # EOT batched
    assert "Attack cost" in (evaluated[0] / "tiny" / "report.md").read_text()


def test_report_schema(evaluated: tuple[Path, dict[str, Any]]) -> None:
    root, report = evaluated
    run = root / "tiny"
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report))
    names = {*ATTACKS, "transfer_pgd_linf"}
    assert set(report["robust_acc"]) == names and set(report["attacks"]) == names
    assert report["attacks"]["transfer_pgd_linf"]["threat"] == "transfer"
    assert report["attacks"]["evade_clean"]["lambdas"] == [1.0, 10.0]

    worst = report["worst_case"]["linf eps=0.2"]
    assert worst["white_box"]["attacks"] == ["adaptive", "evade_clean", "autoattack_rand"]
    assert worst["white_box"]["dad"] <= min(report["robust_acc"][n]["dad"] for n in worst["white_box"]["attacks"])
    assert worst["classifier_only"]["dad"] == pytest.approx(report["robust_acc"]["pgd_linf"]["dad"])
    assert worst["all_attacks"]["attacks"] == [*ATTACKS, "transfer_pgd_linf"]
    assert worst["all_attacks"]["dad"] <= min(worst["white_box"]["dad"], worst["classifier_only"]["dad"])
    assert worst["white_box"]["n"] == 50 and worst["classifier_only"]["n"] == 75
    assert set(worst["mixed"]) == {"mixed_pgd_linf_0.1", "mixed_pgd_linf_0.5", "mixed_evade_clean_0.1",
                                   "mixed_evade_clean_0.5"}
    assert worst["headline"]["dad"] == min(worst["headline_whole_batch"]["dad"],
                                           *(m["dad"] for m in worst["mixed"].values()))
    for entry in (worst["headline"], worst["all_attacks"], *worst["mixed"].values()):
        assert entry["ci95"][0] <= entry["dad"] <= entry["ci95"][1]
    for name, acc in report["robust_acc"].items():
        assert acc["dad"] <= acc["dad_mean"] + 1e-9 and acc["dad_ci95"][0] <= acc["dad"] <= acc["dad_ci95"][1]
        d, lo, hi = acc["dad_minus_undefended"]
        assert lo <= d <= hi and d == pytest.approx(acc["dad"] - acc["undefended"])

    det = report["detection"]
    assert report["num_test"] == 75 and report["num_test_defense"] == 50 and det["clean_pool"] == 100
    assert det["fpr_check"]["disjoint_batches"] == 4 and det["fpr_check"]["calibration_pool"] == 150
    assert set(det["auroc"]["pgd_linf"]) == {"10", "25"} and set(det["auroc"]["adaptive"]) == {"25"}
    for per_size in det["auroc"].values():
        assert all(0.0 <= v <= 1.0 for v in per_size.values())
    for size in ("10", "25"):
        entry = det["by_batch_size"][size]
        assert entry["calibrated"] and 0.0 <= entry["fpr_clean"] <= 1.0 and "pgd_linf" in entry["tpr"]
        assert set(entry["robust_acc_dad"]) == {"pgd_linf", "transfer_pgd_linf"}

    mixed = report["mixed"]["mixed_evade_clean_0.1"]
    assert (mixed["attack"], mixed["fraction"], mixed["threat"], mixed["n"]) == ("evade_clean", 0.1, "defense", 50)
    assert report["transfer"]["source"]["model"] == "small_cnn"

    assert set(report["sanity"]) == SANITY
    for check in report["sanity"].values():
        assert isinstance(check["passed"], bool) and check["detail"]
    assert report["sweep"]["eps"] == pytest.approx([0.1, 0.2, 0.5])
    assert len(report["sweep"]["undefended"]) == 3

    for path in report["plots"].values():
        assert (run / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"roc", "mmd_histogram", "accuracy_vs_eps", "mixed_batches", "images"} <= set(report["plots"])
    assert list((run / "logs" / "eval").glob("events.out.tfevents.*"))
    markdown = (run / "report.md").read_text()
    assert markdown.startswith("DAD with **batch** routing")
    assert "Sanity checks" in markdown and "Mixed batches" in markdown

    samples = torch.load(run / "report_samples.pt", weights_only=True)
    headline = samples["linf eps=0.2/headline/samples"]
    assert headline.dtype == torch.bool and headline.float().mean().item() == pytest.approx(worst["headline"]["dad"])
    assert len(samples["linf eps=0.2/all_attacks/samples"]) == worst["all_attacks"]["n"]

    state_file = run / "eval_state" / "adaptive.pt"
    state = AttackState.from_disk(state_file, _key(state_file))
    assert sorted(state.batches) == [0, 1]  # 50 images attacked through the defense, in batches of 25
    assert state.gather("dad").float().mean().item() == pytest.approx(report["robust_acc"]["adaptive"]["dad"])


def test_the_more_steps_check_continues_the_main_runs_aes(
        evaluated: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sanity attack's 2x-steps re-run starts every batch from the main run's AEs of that batch and runs the
    configured steps again (2x in all, at half the cost of a run from scratch); it reproduces the first evaluation's
    result."""
    cfg = _copy(evaluated, tmp_path)
    run = tmp_path / "tiny"
    name, spec_steps = "sanity__adaptive__eps1_steps2_eot1_seed0", ATTACKS["adaptive"]["steps"]
    (run / "eval_state" / f"{name}.pt").unlink()
    starts: list[torch.Tensor | None] = []
    real = evaluator_module.run_seeded

    def recording(spec: AttackSpec, *args: Any, **kwargs: Any) -> torch.Tensor:
        warm = attack_common._WARM_START.get()
        starts.append(None if warm is None else warm.points.clone())
        assert spec.steps == spec_steps  # the configured steps, not twice them
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(evaluator_module, "run_seeded", recording)
    report = evaluate(cfg)
    main = AttackState.from_disk(run / "eval_state" / "adaptive.pt", _key(run / "eval_state" / "adaptive.pt"))
    assert len(starts) == 1 and torch.equal(starts[0], main.batches[0]["x_adv"])  # 25 sanity images: one batch
    assert report["sanity"]["more_steps"]["detail"].endswith(f"(its AEs continued for {spec_steps} more steps)")
    assert report["sanity"] == evaluated[1]["sanity"]  # the re-run reproduces the first evaluation's


def _key(path: Path) -> str:
    return torch.load(path, weights_only=True)["key"]


class _Counter:
    """Counts (and optionally interrupts) the attack runs of the evaluation."""

    def __init__(self, fail_on: tuple[str, int] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_on = fail_on
        self.real = evaluator_module.run_seeded

    def __call__(self, preset, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(preset.as_dict())
        if self.fail_on and sum(_is(c, self.fail_on[0]) for c in self.calls) == self.fail_on[1]:
            raise RuntimeError("simulated crash")
        return self.real(preset, *args, **kwargs)


def _is(call: dict[str, Any], name: str) -> bool:
    spec = {"objective": "adaptive", "lambdas": [], "seed": 0, **ATTACKS[name]}
    return all(call[k] == v for k, v in spec.items() if k != "batch_size")  # the evaluation sets the batch size


def test_resume_reuses_matching_states_only(evaluated: tuple[Path, dict[str, Any]], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _copy(evaluated, tmp_path)
    counter = _Counter()
    monkeypatch.setattr(evaluator_module, "run_seeded", counter)
    again = evaluate(cfg)
    assert counter.calls == []  # every attack (sanity re-runs included) came from eval_state/
    for key in ("robust_acc", "worst_case", "sanity"):
        assert again[key] == evaluated[1][key]

    cfg = _config(tmp_path, evade_clean={"steps": 4})  # a changed attack is recomputed, nothing else
    evaluate(cfg)
    assert counter.calls and all(c["objective"] == "evade_clean" and c["steps"] in (4, 8) for c in counter.calls)


def test_interrupted_attack_resumes_from_its_finished_batches(evaluated: tuple[Path, dict[str, Any]],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _copy(evaluated, tmp_path)
    state_file = tmp_path / "tiny" / "eval_state" / "adaptive.pt"
    state_file.unlink()
    monkeypatch.setattr(evaluator_module, "run_seeded", _Counter(fail_on=("adaptive", 2)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(cfg)
    assert sorted(AttackState.from_disk(state_file, _key(state_file)).batches) == [0]

    counter = _Counter()
    monkeypatch.setattr(evaluator_module, "run_seeded", counter)
    report = evaluate(cfg)
    assert [_is(c, "adaptive") for c in counter.calls] == [True]  # only the missing second batch
    assert report["robust_acc"] == evaluated[1]["robust_acc"]


def test_the_classifier_alone_is_a_routing_of_the_same_harness(
        evaluated: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _copy(evaluated, tmp_path)
    cfg = replace(cfg, eval=replace(cfg.eval, routing="never", transfer=TransferSettings(), mixed_attacks=[]))
    counter = _Counter()
    monkeypatch.setattr(evaluator_module, "run_seeded", counter)
    report = evaluate(cfg)
    run = tmp_path / "tiny"
    # the classifier-only AEs of the defense's evaluation are read, not crafted again, and judged by this routing
    assert counter.calls and not any(c["threat"] == "classifier" for c in counter.calls)
    own, alone = (run / folder / "pgd_linf.pt" for folder in ("eval_state", "eval_state_never"))
    assert torch.equal(AttackState.from_disk(own, _key(own)).gather("x_adv"),
                       AttackState.from_disk(alone, _key(alone)).gather("x_adv"))
    assert (run / "report_never.json").is_file() and (run / "report_never_samples.pt").is_file()
    assert report["routing"] == "never" and (run / "eval_state_never" / "pgd_linf.pt").is_file()
    assert _key(run / "eval_state" / "pgd_linf.pt") != _key(run / "eval_state_never" / "pgd_linf.pt")  # both kept
    for entry in (report["clean_acc"], report["robust_acc"]["pgd_linf"]):
        assert entry["dad"] == entry["undefended"] and entry["dad"] == entry["dad_mean"]
    assert report["detection"]["clean_purified"] == 0.0 and report["detection"]["fpr_check"] is None
    assert "fpr" not in report["sanity"]
    worst = report["worst_case"]["linf eps=0.2"]
    assert worst["all_attacks"]["dad"] <= report["robust_acc"]["pgd_linf"]["undefended"]

    rows, difference = leaderboard_rows(run, "standard", None, "pgd_linf")  # bench/robust.py's reading of both
    alone, with_dad = rows
    assert (alone["setting"], with_dad["setting"]) == ("alone", "with DAD")
    assert alone["worst_case"] == worst["headline"]["dad"] and alone["clean_fpr"] is None
    assert with_dad["worst_case"] == evaluated[1]["worst_case"]["linf eps=0.2"]["headline"]["dad"]
    low, high = difference["ci95"]
    assert low <= difference["dad_minus_alone"] <= high and difference["n"] == worst["headline"]["n"]


def test_an_evasion_attack_rechecked_with_heavier_penalties_folds_what_they_find(
        evaluated: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """With a detector-evasion attack as the sanity attack, its schedule extended by 10x its largest weight is run
    on the subset, checked against the attack as configured, and folded into the worst case."""
    cfg = _copy(evaluated, tmp_path)
    cfg = replace(cfg, eval=replace(cfg.eval, sanity_attack="evade_clean"))
    report = evaluate(cfg)
    check = report["sanity"]["more_lambdas"]
    assert check["detail"].startswith("evade_clean: penalty weights [1.0, 10.0, 100.0]")
    folded = report["worst_case"]["linf eps=0.2"]["folded"]
    assert "sanity__evade_clean__lambdas_x10" in folded["attacks"] and folded["n"] == 25  # the sanity subset


def test_the_transfer_source_depends_on_its_seed_only(evaluated: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """Trained twice after different random states (what ran before it in an evaluation), the transfer source model
    has the same weights: its seed fixes its initialisation and its training."""
    cfg = _copy(evaluated, tmp_path)
    cfg = replace(cfg, eval=replace(cfg.eval, resume=False))
    ctx, dm = open_context(cfg)
    weights = []
    for state in (1, 2):
        torch.manual_seed(state)
        model, _ = transfer_source(ctx, dm, cfg.eval.transfer)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], rtol=0, atol=0)


def test_classifier_only_mixed_attacks_judge_the_aes_of_the_same_attack(evaluated: tuple[Path, dict[str, Any]]) -> None:
    """A classifier-only attack's AEs do not depend on the batch: each mixed batch judges the AEs the same attack
    made on whole batches (one crafted store), at every fraction."""
    states = evaluated[0] / "tiny" / "eval_state"
    main = AttackState.from_disk(states / "pgd_linf.pt", _key(states / "pgd_linf.pt")).gather("x_adv")
    for fraction in ("0.1", "0.5"):
        path = states / f"mixed_pgd_linf_{fraction}.pt"
        mixed = AttackState.from_disk(path, _key(path)).gather("x_adv")
        assert len(mixed) == 50 and torch.equal(mixed, main[:50])
