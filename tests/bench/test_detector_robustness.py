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
