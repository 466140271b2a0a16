"""bench/detector_robustness.py: evasion success against its definition, judged by each test alone."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.detector_robustness import evasion_success  # noqa: E402
from evaluation.state import AttackState  # noqa: E402
from tests.conftest import tiny_defense  # noqa: E402


def test_evasion_success_is_the_share_unflagged_by_each_test_and_misclassified() -> None:
    defense = tiny_defense([10])
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (20,), generator=generator)
    assert defense.sample_detector is not None
    defense.sample_detector.threshold.fill_(defense.sample_detector.scores(x).median())  # half the images flagged
    batches = {i: {"index": torch.arange(10 * i, 10 * i + 10), "x_adv": x[10 * i:10 * i + 10]} for i in range(2)}
    state = AttackState("k", batches)
    found = evasion_success(defense, {"evade": state}, labels, draws=2, seeds={"evade": 0})

    with torch.no_grad():
        wrong = defense.classifier(x).argmax(1) != labels  # an unflagged image takes the clean route
        sample_flags = defense.sample_detector.scores(x) > defense.sample_detector.threshold
        batch_flags = torch.cat([defense.detector.decide(defense.detector.score(x[i:i + 10]), 10).expand(10)
                                 for i in (0, 10)])
    assert 0 < int(sample_flags.sum()) < 20
    assert found["sample"] == found["sample_per_attack"]["evade"]
    assert abs(found["sample"] - float((~sample_flags & wrong).float().mean())) < 1e-6
    assert abs(found["batch"] - float((~batch_flags & wrong).float().mean())) < 1e-6
    assert defense.routing == "batch"  # the defense's own routing is left as it was


def test_the_markdown_has_a_row_per_run_and_a_column_per_comparison() -> None:
    from bench.detector_robustness import markdown

    row = {"name": "DAD", "clean_acc": 0.99, "worst_case": 0.5, "worst_case_ci95": [0.4, 0.6], "worst_case_n": 200,
           "evasion_success": {"batch": 0.25, "sample": 0.5}, "clean_fpr": 0.05, "training_seconds": 10.0,
           "clean_ms_per_image": 0.1, "vs": {"alone": {"difference": -0.02, "ci95": [-0.05, 0.01], "n": 200}}}
    table = markdown({"digits": [row, {**row, "name": "alone", "evasion_success": None, "clean_fpr": None}],
                      "runs": {"digits": {"threat": "linf eps=0.2"}}, "cifar10_cpu": []})
    assert "| DAD | 99.0 | 50.0 [40.0, 60.0] (n=200) | 0.250 / 0.500 | 5.0 | 10 | 0.100 | -2.0 [-5.0, +1.0] |" in table
    assert "| alone | 99.0 | 50.0 [40.0, 60.0] (n=200) | - | - |" in table and "cifar10_cpu" not in table
