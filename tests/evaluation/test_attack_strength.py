"""On a small trained run, attacks through the defense do their job (and a sign error would be caught)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

import dad.attacks.objectives as objectives
from dad.attacks import AttackSpec, run_attack
from dad.defense import DADDefense
from dad.defense_file import load_defense
from datamodules.settings import DataSettings
from lightning_modules.classifier import ClassifierSettings
from lightning_modules.kernel import KernelSettings
from pipeline.config import DefenseSettings
from pipeline.paths import RunPaths
from pipeline.stages import load_datamodule, run_pipeline
from tests.conftest import tiny_config

B = 25
LINF = {"norm": "linf", "eps": 0.2, "steps": 15}
THROUGH = {
    "apgd_adaptive": AttackSpec(name="apgd", threat="defense", loss="ce+dlr", eot_samples=2, **LINF),
    "apgd_evade_clean": AttackSpec(name="apgd", threat="defense", objective="evade_clean", lambdas=[1.0, 10.0],
                                   **LINF),
    "apgd_evade_bpda": AttackSpec(name="apgd", threat="defense", objective="evade_bpda", eot_samples=2, **LINF),
    "pgd_evade_denoised": AttackSpec(name="pgd", threat="defense", objective="evade_denoised", step_size=0.03,
                                     eot_samples=2, **LINF),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[DADDefense, Tensor, Tensor]:
    """A small DAD on all of digits whose denoiser restores much of the accuracy under classifier-only PGD."""
    cfg = tiny_config(tmp_path_factory.mktemp("strength"))
    cfg = replace(cfg, data=DataSettings(mmd_per_class=20, val_size=300, test_size=200),
                  classifier=ClassifierSettings(epochs=15, lr=2e-3), kernel=KernelSettings(steps=200, lr=1e-2),
                  attack=AttackSpec(name="pgd", eps=0.2, step_size=0.03, steps=10, batch_size=256),
                  denoiser=replace(cfg.denoiser, epochs=6, lr=2e-3, alpha=0.1, milestones=[],
                                   net={"enc_widths": [16, 32], "enc_depths": [1, 1], "dec_widths": [16],
                                        "dec_depths": [1]}),
                  defense=DefenseSettings(reference_size=50, calibration_batches=400, batch_size=B))
    run_pipeline(cfg)
    x, y = load_datamodule(cfg, RunPaths(cfg.run.dir)).split_tensors("test")
    return load_defense(RunPaths(cfg.run.dir).defense), x[:100], y[:100]


def _accuracy(defense: DADDefense, spec: AttackSpec, x: Tensor, y: Tensor, draws: int = 3) -> float:
    """DAD's accuracy on the AEs of ``spec``, batch by batch; a sample counts only if right in every draw."""
    torch.manual_seed(0)
    right = []
    for i in range(0, len(y), B):
        xb, yb = x[i:i + B], y[i:i + B]
        target = defense if spec.threat == "defense" else defense.classifier
        x_adv = run_attack(spec, target, xb, yb)
        with torch.no_grad():
            right.append(torch.stack([defense(x_adv).argmax(1) == yb for _ in range(draws)]).all(0))
    return torch.cat(right).float().mean().item()


@pytest.fixture(scope="module")
def classifier_only(trained) -> float:  # type: ignore[no-untyped-def]
    defense, x, y = trained
    return _accuracy(defense, AttackSpec(name="pgd", step_size=0.02, **{**LINF, "steps": 20}), x, y)


def test_the_defense_helps_against_classifier_only_attacks(trained, classifier_only) -> None:
    defense, x, y = trained
    with torch.no_grad():
        undefended = (defense.classifier(x).argmax(1) == y).float().mean().item()
    assert classifier_only > 0.3 and undefended > 0.8  # otherwise there would be nothing to lower


@pytest.mark.parametrize("name", list(THROUGH))
def test_each_attack_through_the_defense_lowers_dad_below_the_classifier_only_figure(
        name: str, trained, classifier_only) -> None:
    defense, x, y = trained
    assert _accuracy(defense, THROUGH[name], x, y) < classifier_only - 0.1


def test_evade_clean_keeps_most_batches_below_the_threshold(trained) -> None:
    defense, x, y = trained
    below = 0
    torch.manual_seed(0)
    for i in range(0, len(y), B):
        x_adv = run_attack(THROUGH["apgd_evade_clean"], defense, x[i:i + B], y[i:i + B])
        with torch.no_grad():
            below += int(not defense.forward_with_info(x_adv).adversarial)
    assert below >= 3  # of 4 batches


def test_a_sign_flipped_objective_fails_the_strength_test(trained, classifier_only, monkeypatch) -> None:
    real = objectives.classification_loss
    monkeypatch.setattr(objectives, "classification_loss", lambda *args: -real(*args))
    defense, x, y = trained
    assert not _accuracy(defense, THROUGH["apgd_evade_clean"], x, y) < classifier_only - 0.1


def test_one_adversarial_image_in_a_clean_batch_is_purified_alone(trained) -> None:
    defense, x, y = trained
    defense.routing = "sample"
    try:
        with torch.no_grad():
            clean_flags = defense.forward_with_info(x).flags
        neighbours = x[~clean_flags][: B - 1]  # clean images the per-sample test lets through
        spec = AttackSpec(name="pgd", step_size=0.02, **{**LINF, "steps": 20})
        torch.manual_seed(0)
        aes = run_attack(spec, defense.classifier, x[:20], y[:20])
        purified = 0
        with torch.no_grad():
            together = defense.forward_with_info(aes).flags  # the 20 AEs in one batch
            for ae, flagged_together in zip(aes, together):
                flags = defense.forward_with_info(torch.cat([ae[None], neighbours])).flags
                purified += int(flags[0])
                assert flags[0] == flagged_together  # its route does not depend on the batch it came in
                assert not flags[1:].any()  # the neighbours keep their own route
        # of 20 single AEs, each in a batch of clean images; clean images are flagged at the calibrated 5%, so 8 or
        # more would happen by chance with probability 3e-6 (the tiny detector's rate varies with the CPU's
        # floating point: 16 of 20 measured on an AMD EPYC, 11 on an Intel Xeon)
        assert purified >= 8
    finally:
        defense.routing = "batch"
