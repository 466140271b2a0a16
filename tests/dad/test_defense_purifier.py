"""A diffusion purifier as DADDefense's purification path: dispatch, sharing, saving, and the EPS objective."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks.objectives import defense_objective
from dad.defense import DADDefense
from dad.defense_file import load_defense
from dad.diffusion import DiffusionPurifier, DiffusionSchedule, ScoreUNet, SSNIPurifier
from dad.detector import MMDDetector
from dad.kernels import SemanticKernel
from dad.models import create_model
from dad.purification import DenoiserPurifier


def _base() -> DADDefense:
    torch.manual_seed(0)
    classifier = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    detector = MMDDetector(SemanticKernel(classifier, sigma_phi=10.0, sigma_q=128.0), torch.rand(20, 1, 8, 8))
    detector.calibrate(torch.rand(60, 1, 8, 8), [10], num_batches=200, generator=torch.Generator().manual_seed(0))
    return DADDefense(classifier, detector, DenoiserPurifier(nn.Identity(), noise_std=0.1))


def _ssni() -> SSNIPurifier:
    torch.manual_seed(1)
    net = ScoreUNet(in_channels=1, widths=(8, 16), blocks_per_level=1)
    nn.init.normal_(net.output[-1].weight, std=0.1)
    ssni = SSNIPurifier(DiffusionPurifier(net.eval(), DiffusionSchedule(), 20, "ddim", 3), bias=5.0)
    ssni.calibrate(torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    return ssni


def _images(n: int = 10) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def test_the_purifier_replaces_noise_and_denoiser_and_shares_the_rest() -> None:
    base, ssni = _base(), _ssni()
    defense = base.with_purifier(ssni, "always")
    assert defense.classifier is base.classifier and defense.detector is base.detector
    assert defense.routers is base.routers and defense.purifier is ssni
    assert isinstance(base.purifier, DenoiserPurifier) and base.routing == "batch" and defense.routing == "always"
    x = _images()
    outputs = []
    for purify in (defense.purify, ssni):
        torch.manual_seed(5)
        with torch.no_grad():
            outputs.append(purify(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    with torch.no_grad():
        draws = defense.forward_draws(x, 2)
    assert bool(draws.flags.all()) and not torch.equal(draws.logits[0], draws.logits[1])  # fresh noise per run


def test_several_runs_share_the_timesteps_and_repeat_single_runs_exactly() -> None:
    ssni = _ssni()
    defense = _base().with_purifier(ssni, "always")
    x = _images()
    calls: list[int] = []
    ssni.register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(9)
    with torch.no_grad():
        together = defense.forward_draws(x, 3).logits
    torch.manual_seed(9)
    with torch.no_grad():
        one_by_one = torch.stack([defense.classifier(defense.purify(x)) for _ in range(3)])
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=0)
    assert len(calls) == 3  # the three single runs; forward_draws computed t(x) once, without calling forward


def test_a_saved_defense_with_a_purifier_reloads_exactly(tmp_path: Path) -> None:
    defense = _base().with_purifier(_ssni(), "always")  # the denoiser is not part of it
    defense.save(tmp_path / "defense_ssni.pt")
    loaded = load_defense(tmp_path / "defense_ssni.pt", checkpoint=True)
    assert isinstance(loaded.purifier, SSNIPurifier) and loaded.purifier.purifier.checkpoint
    assert loaded.routing == "always" and not loaded.training
    x = _images()
    outputs = []
    for model in (defense, loaded):
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_the_eps_objective_is_the_adaptive_loss_minus_the_standardised_eps_norm() -> None:
    ssni = _ssni()
    defense = _base().with_purifier(ssni, "always")
    x, y = _images(), torch.arange(10)
    objective = defense_objective(defense, y, "evade_eps", lam=2.0)
    torch.manual_seed(11)
    value = objective(x)
    torch.manual_seed(11)
    expected = F.cross_entropy(defense.classifier(ssni(x)), y, reduction="none") - 2.0 * ssni.standardized_norms(x)
    torch.testing.assert_close(value, expected)
    x_var = x.clone().requires_grad_(True)
    objective(x_var).sum().backward()
    assert x_var.grad is not None and bool(torch.isfinite(x_var.grad).all()) and x_var.grad.abs().sum() > 0
    without = _base().with_purifier(ssni.purifier, "always")  # no SSNI: no EPS term
    torch.manual_seed(11)
    plain = defense_objective(without, y, "evade_eps", lam=2.0)(x)
    torch.manual_seed(11)
    torch.testing.assert_close(plain, F.cross_entropy(without.classifier(ssni.purifier(x)), y, reduction="none"))
