"""Attacks through the whole DADDefense (adaptive, evasion, BPDA, APGD, Square) and the attack spec's validation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks import AttackSpec, run_attack, target_of
from dad.attacks.judging import error_rates, strongest_batch
from dad.attacks.objectives import defense_objective
from dad.defense import DADDefense
from dad.denoisers import UNetDenoiser
from dad.detector import MMDDetector
from dad.kernels import SemanticKernel
from dad.models import create_model
from dad.purification import DenoiserPurifier
from dad.runs import runs_settings

B = 10


def _defense(noise_std: float = 0.1) -> DADDefense:
    torch.manual_seed(0)
    classifier = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    kernel = SemanticKernel(classifier, sigma_phi=10.0, sigma_q=128.0)
    detector = MMDDetector(kernel, torch.rand(20, 1, 8, 8))
    detector.calibrate(torch.rand(60, 1, 8, 8), [B], num_batches=400, generator=torch.Generator().manual_seed(0))
    denoiser = UNetDenoiser(in_channels=1, enc_widths=(4, 8), enc_depths=(1, 1), dec_widths=(4,), dec_depths=(1,))
    return DADDefense(classifier, detector, DenoiserPurifier(denoiser.eval(), noise_std))


@pytest.fixture(scope="module")
def defense() -> DADDefense:
    return _defense()


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(B, 1, 8, 8, generator=g), torch.randint(0, 10, (B,), generator=g)


LINF = {"name": "pgd", "threat": "defense", "norm": "linf", "eps": 0.1, "step_size": 0.03, "steps": 2,
        "eot_samples": 2}
PRESETS = {
    "adaptive": LINF,
    "adaptive_schedule": {**LINF, "lambdas": [0.0, 1.0]},
    "adaptive_l2": {**LINF, "norm": "l2", "eps": 0.5, "step_size": 0.2},
    "evade_clean": {**LINF, "objective": "evade_clean", "lambdas": [1.0, 10.0]},
    "evade_denoised": {**LINF, "objective": "evade_denoised"},
    "evade_soft": {**LINF, "objective": "evade_soft", "norm": "l2", "eps": 0.5, "step_size": 0.2},
    "evade_bpda": {**LINF, "objective": "evade_bpda", "lambdas": [0.0, 1.0]},
    "evade_eps": {**LINF, "objective": "evade_eps", "lambdas": [1.0]},  # no SSNI purifier: the adaptive loss
    "autoattack_rand": {"name": "apgd", "threat": "defense", "loss": "ce+dlr", "norm": "linf", "eps": 0.1,
                        "steps": 2, "eot_samples": 2},
    "apgd_evade_clean": {"name": "apgd", "threat": "defense", "objective": "evade_clean", "norm": "l2", "eps": 0.5,
                         "steps": 3, "lambdas": [1.0, 10.0]},
    "orthogonal_pgd": {**LINF, "name": "orthogonal_pgd", "objective": "evade_clean", "eot_samples": 1},
    "selective_pgd": {**LINF, "name": "selective_pgd", "objective": "evade_clean", "eot_samples": 1,
                      "norm": "l2", "eps": 0.5, "step_size": 0.2},
    "square": {"name": "square", "threat": "defense", "norm": "linf", "eps": 0.1, "steps": 20, "eot_samples": 2},
    "pgd_classifier": {**LINF, "threat": "classifier", "eot_samples": 1},
    "cw_l2_classifier": {"name": "cw_l2", "threat": "classifier", "norm": "l2", "eps": 0.3, "steps": 5,
                         "step_size": 0.1},
    "autoattack_classifier": {"name": "autoattack", "threat": "classifier", "norm": "linf", "eps": 0.1, "steps": 2},
    "apgd_classifier": {"name": "apgd", "threat": "classifier", "norm": "linf", "eps": 0.1, "steps": 3},
    "mma_classifier": {"name": "mma", "threat": "classifier", "norm": "linf", "eps": 0.1, "step_size": 0.03,
                       "steps": 2, "k": 2},
    "square_classifier": {"name": "square", "threat": "classifier", "norm": "linf", "eps": 0.1, "steps": 20},
}


def _distance(a: Tensor, b: Tensor, norm: str) -> Tensor:
    d = (a - b).flatten(1)
    return d.abs().max(1).values if norm == "linf" else d.norm(dim=1)


@pytest.mark.parametrize("name", list(PRESETS))
def test_attack_constraints_and_modes_restored(name: str, batch: tuple[Tensor, Tensor]) -> None:
    defense = _defense()
    defense.train()
    defense.purifier.denoiser.eval()  # a deliberately frozen submodule must stay frozen
    defense.classifier.head.weight.requires_grad_(True)
    modes = {n: m.training for n, m in defense.named_modules()}
    flags = {n: p.requires_grad for n, p in defense.named_parameters()}
    preset = AttackSpec(**PRESETS[name])
    x, y = batch
    torch.manual_seed(0)
    x_adv = run_attack(preset, target_of(preset, defense), x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (_distance(x_adv, x, preset.norm) <= preset.eps + 1e-5).all()
    assert {n: m.training for n, m in defense.named_modules()} == modes
    assert {n: p.requires_grad for n, p in defense.named_parameters()} == flags
    assert all(p.grad is None for p in defense.parameters())


def test_defense_attacks_move_the_input(defense: DADDefense, batch: tuple[Tensor, Tensor]) -> None:
    """Every white-box attack takes gradient steps (a silently masked attack would return its start); every step
    of its budget (no early stop: one step already fools this small model), but orthogonal / selective PGD, which
    by definition stop moving an image once it is misclassified and undetected (at least one step)."""
    x, y = batch
    for name in ("adaptive", "evade_clean", "evade_denoised", "evade_bpda", "orthogonal_pgd"):
        preset = AttackSpec(**{**PRESETS[name], "random_start": False})
        torch.manual_seed(0)
        with runs_settings(early_stop=False):
            moved = (run_attack(preset, defense, x, y) - x).abs().max()
        assert moved > (0.02 if name == "orthogonal_pgd" else 0.05), name


@pytest.mark.parametrize("name", ["autoattack_rand", "apgd_evade_clean", "evade_bpda", "square"])
def test_attacks_query_whole_batches_only(name: str, defense: DADDefense, batch: tuple[Tensor, Tensor]) -> None:
    sizes: list[int] = []
    hook = defense.classifier.body.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        x, y = batch
        run_attack(AttackSpec(**PRESETS[name]), defense, x, y)
    finally:
        hook.remove()
    # every classifier pass (both routes) sees whole batches: one, or several runs of it along the leading dimension
    assert sizes and all(size % B == 0 for size in sizes)


def test_bpda_value_is_the_real_routed_loss() -> None:
    """Forward, BPDA equals the cross-entropy of the path the hard decision takes (noise off: deterministic)."""
    defense = _defense(noise_std=0.0)
    x, y = torch.rand(B, 1, 8, 8), torch.randint(0, 10, (B,))
    with torch.no_grad():
        score = defense.detector.score(x)
        clean = F.cross_entropy(defense.classifier(x), y)
        denoised = F.cross_entropy(defense.classifier(defense.purify(x)), y)
        for shift, expected in ((1.0, clean), (-1.0, denoised)):
            defense.detector.thresholds.fill_(score.item() + shift)  # the batch is below / above the threshold
            value = defense_objective(defense, y, "evade_bpda", 0.0)(x).mean()
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)
            soft = defense_objective(defense, y, "evade_soft", 0.0, temperature=1e-3)(x).mean()
            torch.testing.assert_close(soft, expected, rtol=1e-4, atol=1e-5)


def test_evasion_hinge_is_zero_below_the_target() -> None:
    defense = _defense(noise_std=0.0)
    x, y = torch.rand(B, 1, 8, 8), torch.randint(0, 10, (B,))
    with torch.no_grad():
        score = defense.detector.score(x)
        ce = F.cross_entropy(defense.classifier(x), y)
        defense.detector.thresholds.fill_(score.item() * 2 + 1)  # the score well below the threshold
        far_above = defense_objective(defense, y, "evade_clean", 10.0)(x).mean()
        torch.testing.assert_close(far_above, ce)
        threshold = score - 0.5  # score above the threshold: relative excess 0.5 / |threshold|
        defense.detector.thresholds.fill_(threshold.item())
        penalised = defense_objective(defense, y, "evade_clean", 10.0, margin=0.1)(x).mean()
        expected = ce - 10.0 * (0.5 / threshold.abs() + 0.1)
        torch.testing.assert_close(penalised, expected, rtol=1e-4, atol=1e-4)


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.eye(4))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.w


def test_strongest_batch_picks_the_batch_or_the_per_sample_mix() -> None:
    model = _Linear()
    y = torch.tensor([0, 1, 2, 3])
    good = torch.eye(4).view(4, 1, 2, 2)  # image i predicts class i: all right
    wrong = good.roll(1, dims=0)  # all wrong
    half_a = torch.cat([wrong[:2], good[2:]])
    half_b = torch.cat([good[:2], wrong[2:]])

    def judge(z: Tensor) -> Tensor:
        return error_rates(model, z, y)

    assert torch.equal(strongest_batch(judge, [good, wrong]), wrong)
    assert torch.equal(strongest_batch(judge, [good, half_a]), half_a)
    assert torch.equal(strongest_batch(judge, [half_a, half_b]), wrong)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"objective": "nope"}, "Expected `objective` in"),
        ({"loss": "hinge"}, r"Expected `loss` in \('ce', 'dlr', 'ce\+dlr'\)"),
        ({"draws": 0}, "`draws` to be an integer >= 1"),
        ({"name": "square", "norm": "l2"}, r"supports `norm` in \('linf',\)"),
        ({"objective": "evade_clean", "threat": "classifier"}, "set `threat: defense`"),
        ({"name": "mma", "threat": "defense"},
         r"registered for threat 'defense' \(one of \['apgd', 'orthogonal_pgd', 'pgd', 'selective_pgd', 'square'\]\)"),
        ({"name": "cw_l2", "threat": "classifier", "norm": "linf"}, r"supports `norm` in \('l2',\)"),
        ({"lambdas": [-1.0]}, "`lambdas` >= 0"),
        ({"temperature": 0.0}, "`temperature` > 0"),
        ({"margin": 1.0}, r"`margin` in \[0, 1\)"),
        ({"eps": -1.0}, "`eps` > 0"),
    ],
)
def test_spec_validation(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttackSpec(**{"threat": "defense", **spec})


def test_spec_scaling_and_schedule() -> None:
    preset = AttackSpec(threat="defense", eps=0.2, step_size=0.02, steps=10, eot_samples=3, seed=4, mmd_weight=2.0)
    assert preset.schedule == [2.0] and preset.needs_eot
    scaled = preset.scaled(eps_factor=2.5, steps_factor=2, eot_factor=2, seed_offset=1)
    assert (scaled.eps, scaled.step_size, scaled.steps, scaled.eot_samples, scaled.seed) == (0.5, 0.05, 20, 6, 5)
    assert not AttackSpec(threat="defense", objective="evade_clean").needs_eot
    assert "objective" in preset.as_dict() and preset.as_dict()["threat"] == "defense"
