"""Choosing t* and b on held-out images: the rules of dad.diffusion.selection on a toy whose answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dad.diffusion import DiffusionPurifier, DiffusionSchedule, SSNIPurifier
from dad.diffusion.selection import PurifierSettings, accuracy, select_bias, select_t_star


class _ZeroNoise(nn.Module):
    """Predicts no noise: DDIM then returns ``x0 + sigma_t / sqrt(alpha_bar_t) * z``, noisier the larger ``t``."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)


class _Proportional(nn.Module):
    """Predicts noise proportional to the input: EPS norms then vary with the image."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return 0.1 * x


class _Brightness(nn.Module):
    """Class 1 if the mean pixel is above 1/2, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x: Tensor) -> Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([0.5 - m, m - 0.5], 1) * self.scale


def _data(n: int = 200) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (0.45 + 0.1 * y.float()).reshape(-1, 1, 1, 1) + 0.02 * torch.randn(n, 1, 4, 4, generator=g)
    return x.clamp(0, 1), y, (x + 0.2 * (1 - 2 * y.float()).reshape(-1, 1, 1, 1)).clamp(0, 1)  # AEs cross 1/2


def test_t_star_is_the_largest_candidate_within_the_clean_budget() -> None:
    x, y, adversarial = _data()
    classifier, schedule = _Brightness(), DiffusionSchedule()
    settings = PurifierSettings(kinds=["fixed"], t_star_grid=[5, 20, 80, 300], max_clean_drop=0.1, ddim_steps=2)
    chosen = select_t_star(classifier, _ZeroNoise(), schedule, settings, (x, y), adversarial, seed=0)
    clean = {t: r["clean_acc"] for t, r in chosen["candidates"].items()}
    assert chosen["classifier_clean_acc"] == 1.0 and clean[5] > clean[300]  # noise costs clean accuracy
    assert chosen["t_star"] == max(t for t, acc in clean.items() if acc >= 1.0 - 0.1) and chosen["within_budget"]
    strict = select_t_star(classifier, _ZeroNoise(), schedule, PurifierSettings(t_star_grid=[300], max_clean_drop=0),
                           (x, y), adversarial, seed=0)
    assert strict["t_star"] == 300 and not strict["within_budget"]  # nothing qualifies: the smallest


def test_b_maximises_clean_plus_adversarial_accuracy_and_mu_tau_are_calibrated() -> None:
    x, y, adversarial = _data()
    classifier = _Brightness()
    fixed = DiffusionPurifier(_Proportional(), DiffusionSchedule(), 20, "ddim", 2)
    settings = PurifierSettings(kinds=["ssni_n"], t_star_grid=[20], bias_grid=[0.0, 40.0, 200.0])
    ssni, summary = select_bias(classifier, fixed, "sigmoid", settings.bias_grid, settings, x, (x, y), adversarial, 0)
    assert isinstance(ssni, SSNIPurifier) and ssni.bias == summary["bias"] and ssni.mapping == "sigmoid"
    scores = {b: r["clean_acc"] + r["adversarial_acc"] for b, r in summary["candidates"].items()}
    assert scores[summary["bias"]] == max(scores.values())
    assert ssni.mu.item() == pytest.approx(summary["mu"]) and summary["tau"] > 0
    torch.manual_seed(0)
    assert accuracy(classifier, ssni, x, y, 64, seed=0) == summary["candidates"][summary["bias"]]["clean_acc"]


def test_accuracy_counts_an_image_only_if_it_is_right_in_every_draw() -> None:
    x, y, _ = _data(400)

    def coin(z: Tensor) -> Tensor:  # keeps an image or inverts it (its class flips), with probability 1/2 each
        keep = (torch.rand(len(z)) < 0.5).reshape(-1, 1, 1, 1)
        return torch.where(keep, z, 1.0 - z)

    once, thrice = (accuracy(_Brightness(), coin, x, y, 64, seed=0, draws=d) for d in (1, 3))
    assert once == pytest.approx(0.5, abs=0.08) and thrice == pytest.approx(0.125, abs=0.05)
    assert accuracy(_Brightness(), coin, x, y, 64, seed=0, draws=3) == thrice  # seeded: repeatable


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kinds": ["ssni"]}, "purifier.kinds"),
    ({"kinds": ["fixed", "fixed"]}, "distinct"),
    ({"t_star_grid": []}, "t_star_grid"),
    ({"max_clean_drop": 1.5}, "max_clean_drop"),
    ({"t_star_grid": [10], "bias_grid": [-10.0]}, "bias_grid"),
    ({"select_size": 1}, "select_size"),
    ({"ddim_steps": 0}, "ddim_steps"),
])
def test_settings_are_validated(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PurifierSettings(**kwargs)  # type: ignore[arg-type]
