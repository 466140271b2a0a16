"""The worst-case headline (whole batches, mixed batches, folded re-runs) and the FPR check, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dad.attacks import AttackSpec
from dad.routing.batch import BatchRouter
from evaluation.analysis import fpr_check, union, worst_cases

LINF = AttackSpec(name="pgd", eps=0.2, step_size=0.05)


def _correct(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_union_uses_the_common_prefix() -> None:
    assert union([_correct(1, 1, 0, 1), _correct(1, 0)]).tolist() == [True, False]


def test_headline_is_the_lowest_of_whole_batches_mixed_and_folded_figures() -> None:
    specs = {"pgd": LINF, "evade": AttackSpec(name="pgd", threat="defense", eps=0.2, step_size=0.05)}
    threats = {"pgd": "classifier", "evade": "defense"}
    dad = {"pgd": _correct(1, 1, 1, 1, 0, 1, 1, 1), "evade": _correct(1, 1, 0, 1, 1, 1, 1, 1),
           "mixed_pgd_0.1": _correct(1, 0, 0, 0, 1, 1, 1, 1)}
    undefended = {"pgd": _correct(0, 0, 0, 0, 0, 0, 0, 0), "evade": _correct(0, 0, 0, 0, 0, 0, 0, 0)}
    folded = {"linf eps=0.2": {"correct": _correct(0, 1, 0, 1), "attacks": ["pgd", "evade", "x"], "extra_errors": 1}}
    w = worst_cases(specs, threats, dad, undefended, {"mixed_pgd_0.1": ("pgd", 0.1)}, folded)["linf eps=0.2"]
    assert w["all_attacks"]["dad"] == 6 / 8 and w["white_box"]["dad"] == 7 / 8
    assert w["folded"]["dad"] == 0.5 and w["headline_whole_batch"]["source"] == "folded"
    assert w["mixed"]["mixed_pgd_0.1"]["dad"] == 5 / 8
    assert w["headline"]["dad"] == 0.5 and w["headline"]["source"] == "folded"
    lo, hi = w["headline"]["ci95"]
    assert lo < 0.5 < hi and w["headline"]["n"] == 4
    no_extra = {"linf eps=0.2": {**folded["linf eps=0.2"], "extra_errors": 0}}
    w = worst_cases(specs, threats, dad, undefended, {"mixed_pgd_0.1": ("pgd", 0.1)}, no_extra)["linf eps=0.2"]
    assert w["headline"]["source"] == "mixed:mixed_pgd_0.1" and w["headline_whole_batch"]["source"] == "all_attacks"


def test_fpr_check_tolerance_by_hand() -> None:
    batch = BatchRouter()
    check, detail = fpr_check(0.06, 0.05, pool=10_000, calibration_pool=10_000, batch_size=100, router=batch, z=2.0)
    binomial = math.sqrt(0.05 * 0.95 / 100)
    calibration = math.exp(-1.6448536269514722**2 / 2) / math.sqrt(2 * math.pi) * math.sqrt(100 / 10_000)
    assert detail["tolerance"] == pytest.approx(2 * math.sqrt(binomial**2 + calibration**2), rel=1e-6)
    assert detail["disjoint_batches"] == 100 and check.passed
    assert not fpr_check(0.15, 0.05, pool=10_000, calibration_pool=10_000, batch_size=100, router=batch)[0].passed
    assert not fpr_check(0.0, 0.05, pool=10_000, calibration_pool=10_000, batch_size=100, router=batch)[0].passed
    # a small pool of disjoint batches cannot tell 0.10 from 0.05
    assert fpr_check(0.10, 0.05, pool=450, calibration_pool=500, batch_size=50, router=batch)[0].passed
