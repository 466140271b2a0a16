"""The denoiser stage's adversarial option: settings, the route's examples against PGD's definition, robustness."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dad.purification import DenoiserPurifier, PurifiedRoute
from dad.denoisers import UNetDenoiser
from dad.kernels import SemanticKernel
from dad.models import ImageClassifier, create_model
from dad.training.inner import pgd_at_examples
from lightning_modules.denoiser import DenoiserModule, DenoiserSettings

EPS, STEP = 0.2, 0.05


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).div(16).unsqueeze(1), torch.tensor(data.target)


@pytest.fixture(scope="module")
def classifier(digits: tuple[Tensor, Tensor]) -> ImageClassifier:
    """A standard small CNN, 5 epochs on the first 1,200 digits (test accuracy ~0.99 on the next 300)."""
    x, y = digits
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(5):
        for i in range(0, 1200, 64):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def _module(classifier: ImageClassifier, **settings: Any) -> DenoiserModule:
    torch.manual_seed(0)
    net = UNetDenoiser(1, enc_widths=[8, 16], enc_depths=[1, 1], dec_widths=[8], dec_depths=[1])
    options = dict(epochs=3, batch_size=50, milestones=[], noise_std=0.1, adv_eps=EPS, adv_step_size=STEP)
    return DenoiserModule(classifier, SemanticKernel(classifier), net, DenoiserSettings(**{**options, **settings}))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"adv_steps": -1}, "Expected `denoiser.adv_steps` to be an integer >= 0, got -1"),
        ({"adv_steps": 1.5}, "Expected `denoiser.adv_steps` to be an integer >= 0, got 1.5"),
        ({"adv_steps": 3, "adv_eps": 0.0}, "Expected `denoiser.adv_eps` > 0"),
        ({"adv_steps": 3, "adv_weight": -1.0}, "`denoiser.adv_weight` >= 0"),
    ],
)
def test_bad_adversarial_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DenoiserSettings(**settings)


def test_route_examples_are_pgd_of_the_purified_route_and_leave_the_networks_as_they_were(
        classifier: ImageClassifier, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits[0][1200:1400], digits[1][1200:1400]
    module = _module(classifier, adv_steps=10, noise_std=0.0).train()
    examples = module.route_examples(x, y)
    assert (examples - x).abs().max() <= EPS + 1e-6 and examples.min() >= 0 and examples.max() <= 1
    assert module.denoiser.training and not module.classifier.training
    assert all(p.requires_grad and p.grad is None for p in module.denoiser.parameters())
    assert all(p.grad is None for p in module.classifier.parameters())
    route = PurifiedRoute(DenoiserPurifier(module.denoiser, 0.0, "one_sided"), classifier).eval()
    with torch.no_grad():
        clean_acc = (route(x).argmax(1) == y).float().mean().item()
        adv_acc = (route(examples).argmax(1) == y).float().mean().item()
        ce_clean, ce_adv = F.cross_entropy(route(x), y).item(), F.cross_entropy(route(examples), y).item()
    # the untrained denoiser is near the identity: the route is the classifier, which PGD-10 at 0.2 breaks
    assert clean_acc > 0.95 and adv_acc < 0.2 and ce_adv > ce_clean + 1.0


def test_adversarial_training_of_the_denoiser_makes_the_route_more_robust(
        classifier: ImageClassifier, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    train_x, train_y, test_x, test_y = x[:1200], y[:1200], x[1200:1500], y[1200:1500]
    stored = pgd_at_examples(classifier, train_x, train_y, EPS, STEP, 5).examples  # the classifier's AEs
    accuracy = {}
    for steps in (0, 3):
        module = _module(classifier, adv_steps=steps)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(train_x, stored, train_y), batch_size=50,
                                                         shuffle=True))
        route = PurifiedRoute(DenoiserPurifier(module.denoiser, 0.1, "one_sided"), classifier).eval()
        examples = pgd_at_examples(route, test_x, test_y, EPS, 0.02, 20).examples
        with torch.no_grad():
            accuracy[steps] = (route(examples).argmax(1) == test_y).float().mean().item()
    # measured 0.020 (published loss) vs 0.107 (adversarial term, PGD-3) under PGD-20 on 300 held-out digits
    assert accuracy[3] >= accuracy[0] + 0.05, accuracy
