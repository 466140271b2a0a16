"""One attack path: the training AEs and the evaluation's AEs of one spec are the same tensors."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from dad.attacks import AttackSpec
from dad.defense import DADDefense
from dad.denoisers import UNetDenoiser
from dad.detector import MMDDetector
from dad.kernels import SemanticKernel
from dad.models import create_model, freeze
from dad.purification import DenoiserPurifier
from datamodules.ae_cache import load_or_generate
from lightning_modules.evaluator import DefenseEvaluator

CHUNK = 6
SPECS = {
    "pgd": AttackSpec(name="pgd", eps=0.2, step_size=0.05, steps=3, seed=2),
    "mma": AttackSpec(name="mma", eps=0.2, step_size=0.05, steps=3, k=2, seed=2),
    "cw_l2": AttackSpec(name="cw_l2", norm="l2", eps=0.8, step_size=0.05, steps=8, seed=2),
    "autoattack": AttackSpec(name="autoattack", eps=0.2, steps=2, seed=2),
}


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    digits = load_digits()
    x = torch.tensor(digits.images[:300], dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(digits.target[:300])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return freeze(model)


@pytest.mark.parametrize("name", list(SPECS))
def test_training_and_evaluation_paths_give_identical_aes(name: str, classifier: torch.nn.Module, tmp_path) -> None:
    digits = load_digits()
    x = torch.tensor(digits.images[300:318], dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(digits.target[300:318])
    spec = SPECS[name]
    training = load_or_generate(classifier, x, y, AttackSpec(**{**spec.as_dict(), "batch_size": CHUNK}),
                                tmp_path / "aes.pt", "hash", "digest", "mmd")
    kernel = SemanticKernel(classifier)
    defense = DADDefense(classifier, MMDDetector(kernel, x[:CHUNK]),
                         DenoiserPurifier(UNetDenoiser(1, (4, 8), (1, 1), (4,), (1,))))
    evaluator = DefenseEvaluator(defense, {name: spec}, batch_size=CHUNK)
    evaluation = torch.cat([evaluator.attack(spec, x[i:i + CHUNK], y[i:i + CHUNK], batch_idx=i // CHUNK)
                            for i in range(0, len(y), CHUNK)])
    torch.testing.assert_close(evaluation, training, rtol=0, atol=0)
    assert not torch.equal(training, x)  # the attack did move the images
    distance = (training - x).flatten(1)
    radius = distance.norm(dim=1) if spec.norm == "l2" else distance.abs().amax(1)
    assert (radius <= spec.eps + 1e-5).all()  # C&W's minimum-norm AEs are projected onto the ball on both paths


def test_autoattack_honours_steps(classifier: torch.nn.Module) -> None:
    from dad.attacks import run_seeded

    digits = load_digits()
    x = torch.tensor(digits.images[300:306], dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(digits.target[300:306])
    calls = []

    def counted(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return classifier(t)

    counts = []
    for steps in (1, 4):
        calls.clear()
        run_seeded(AttackSpec(name="autoattack", eps=0.05, steps=steps), counted, x, y, chunk=0)
        counts.append(len(calls))
    assert counts[1] > counts[0]
