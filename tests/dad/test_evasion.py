"""Evasion-aware kernel training (dad.evasion, KernelModule with ``adversarial``): the crafted examples lower the
statistics they target while raising the classifier's loss, and the kernel step then raises J against them."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch.nn import functional as F

from dad.evasion import detection_terms, evasion_examples
from dad.kernels import SemanticKernel
from dad.models import create_model
from lightning_modules.kernel import KernelModule, KernelSettings


def _setup() -> tuple[SemanticKernel, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images[:64], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target[:64])
    centroids = torch.stack([x[y == c].flatten(1).mean(0) for c in range(10)])
    linear = torch.nn.Linear(64, 10)
    with torch.no_grad():  # nearest centroid: a classifier whose loss the crafting can raise
        linear.weight.copy_(2 * centroids)
        linear.bias.copy_(-(centroids ** 2).sum(1))
    classifier = torch.nn.Sequential(torch.nn.Flatten(), linear).eval()
    torch.manual_seed(0)
    kernel = SemanticKernel(create_model("small_cnn", num_classes=10, in_channels=1).eval())
    g = torch.Generator().manual_seed(1)
    adversarial = (x + 0.2 * torch.randn(x.shape, generator=g).sign()).clamp(0, 1)  # fixed "AEs": far, visible
    kernel.init_bandwidths(x, adversarial)
    return kernel, classifier, x, y, adversarial


def test_crafted_examples_lower_both_detection_statistics_and_raise_the_classifier_loss():
    kernel, classifier, x, y, adversarial = _setup()
    torch.manual_seed(2)
    start = (x + 0.2 * (2 * torch.rand(x.shape) - 1)).clamp(0, 1)  # a random point of the ball: the crafting's start
    torch.manual_seed(3)
    crafted = evasion_examples(kernel, classifier, x, y, adversarial, eps=0.2, step_size=0.05, steps=5, weight=1.0)
    assert ((crafted - x).abs().amax((1, 2, 3)) <= 0.2 + 1e-6).all() and crafted.min() >= 0 and crafted.max() <= 1
    torch.manual_seed(3)
    unweighted = evasion_examples(kernel, classifier, x, y, adversarial, eps=0.2, step_size=0.05, steps=5, weight=0.0)

    def hinge(z: torch.Tensor) -> float:
        mmd, witness = detection_terms(kernel, x, adversarial, z)
        return (F.relu(mmd) + F.relu(witness).mean()).item()

    with torch.no_grad():
        hinges = {"start": hinge(start), "fixed": hinge(adversarial), "crafted": hinge(crafted)}
        ce = {name: F.cross_entropy(classifier(z), y).item()
              for name, z in (("clean", x), ("crafted", crafted), ("unweighted", unweighted))}
    assert hinges["crafted"] < 0.5 * hinges["start"] and hinges["crafted"] < 0.25 * hinges["fixed"], hinges
    assert ce["unweighted"] > 3 * ce["clean"] and ce["crafted"] > ce["clean"], ce  # the classifier's loss raised


def test_the_adversarial_kernel_step_raises_j_against_what_it_crafted():
    """One step: the batch's AEs mixed with crafted ones (the statistic lowered first, as above), then Adam on -J
    raises J on that very batch."""
    kernel, classifier, x, y, adversarial = _setup()
    module = KernelModule(kernel, KernelSettings(lr=0.05, adversarial=True, adv_steps=5), classifier=classifier,
                          attack_eps=0.2)
    module._initialized = True  # bandwidths set by _setup, as on a fit's first step
    torch.manual_seed(4)
    mixed = module.with_evasions(x, adversarial, y)
    replaced = (mixed != adversarial).flatten(1).any(1)
    assert 0 < replaced.sum() < len(x)  # about half the pairs take a crafted example
    optimiser = torch.optim.Adam(kernel.parameters(), lr=0.05)
    before = kernel.j_statistic(x, mixed).item()
    for _ in range(5):
        optimiser.zero_grad()
        (-kernel.j_statistic(x, mixed)).backward()
        optimiser.step()
    assert kernel.j_statistic(x, mixed).item() > before
