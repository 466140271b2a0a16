"""Every entry of every registry is exercised: a new attack, routing mode, purifier, training method or dataset is
covered by these tests the moment it is registered (and fails them until it has what they need)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dad.attacks import list_attacks
from dad.defense import DADDefense
from dad.denoisers import UNetDenoiser
from dad.detector import MMDDetector
from dad.diffusion import DiffusionPurifier, DiffusionSchedule, ScoreUNet, SSNIPurifier
from dad.kernels import SemanticKernel
from dad.models import create_model
from dad.purification import PURIFIERS, DenoiserPurifier, IdentityPurifier, Purifier, build_purifier
from dad.routing import ROUTERS
from dad.sample_detector import SampleDetector
from dad.training import TRAINING_METHODS, TrainingAttack, build_method
from datamodules import DataSettings
from datamodules.base import DataError
from datamodules.registry import DATAMODULES, build_datamodule
from tests.dad.test_defense_attacks import PRESETS


def _score_net() -> ScoreUNet:
    net = ScoreUNet(in_channels=1, widths=(4, 8), blocks_per_level=1)
    nn.init.normal_(net.output[-1].weight, std=0.1)
    return net.eval()


def _ssni() -> SSNIPurifier:
    ssni = SSNIPurifier(DiffusionPurifier(_score_net(), DiffusionSchedule(), 10, "ddim", 2), bias=2.0)
    ssni.calibrate(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    return ssni


EXAMPLES = {
    "denoiser": lambda: DenoiserPurifier(UNetDenoiser(1, (4, 8), (1, 1), (4,), (1,)).eval(), 0.1),
    "identity": IdentityPurifier,
    "fixed": lambda: DiffusionPurifier(_score_net(), DiffusionSchedule(), 10, "ddim", 2),
    "ssni": _ssni,
}
"""A small instance of every purifier kind (a new kind needs one here)."""


def test_every_registered_attack_is_checked_against_its_constraints() -> None:
    presets = {(p["name"], p.get("threat", "classifier")) for p in PRESETS.values()}
    assert set(list_attacks()) <= presets  # tests/dad/test_defense_attacks.py runs each preset


@pytest.mark.parametrize("kind", sorted(PURIFIERS))
def test_every_purifier_round_trips_its_spec_and_stays_in_the_unit_range(kind: str) -> None:
    assert kind in EXAMPLES, f"add a small `{kind}` purifier to EXAMPLES"
    torch.manual_seed(0)
    purifier: Purifier = EXAMPLES[kind]()
    rebuilt = build_purifier(purifier.spec())
    rebuilt.load_state_dict(purifier.state_dict())
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    outputs = []
    for model in (purifier, rebuilt.eval()):
        torch.manual_seed(2)
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert outputs[0].shape == x.shape and 0 <= outputs[0].min() and outputs[0].max() <= 1
    assert type(rebuilt).kind == kind and len(purifier.runs(x, 2)) == 2


def _defense() -> DADDefense:
    torch.manual_seed(0)
    classifier = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    kernel = SemanticKernel(classifier, sigma_phi=10.0, sigma_q=128.0)
    witness = torch.rand(16, 1, 8, 8)
    return DADDefense(classifier, MMDDetector(kernel, torch.rand(20, 1, 8, 8)), IdentityPurifier(),
                      sample_detector=SampleDetector(kernel, witness, (witness + 0.2).clamp(0, 1)))


@pytest.mark.parametrize("routing", list(ROUTERS))
def test_every_routing_mode_calibrates_decides_and_measures_its_share(routing: str) -> None:
    defense = _defense()
    clean = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    results = defense.calibrate(clean, [10], 0.1, num_batches=400)
    defense.routing = routing
    router = defense.router
    assert router.calibrated and (routing in results) == router.detecting
    x = clean[:10]
    with torch.no_grad():
        detection = defense.detect(x, defense.classify_with_features(x)[1])
        logits = defense(x)
    assert detection.flags.shape == (10,) and detection.flags.dtype == torch.bool and logits.shape == (10, 10)
    share = defense.purified_share(clean, 10, 400, torch.Generator().manual_seed(4))
    expected = {"never": 0.0, "always": 1.0}.get(routing, 0.1)
    assert abs(share - expected) < 0.06, share  # on the calibration pool itself


@pytest.mark.parametrize("name", list(TRAINING_METHODS))
def test_every_training_method_gives_a_differentiable_loss_within_its_budget(name: str) -> None:
    method = build_method(name, TrainingAttack(eps=0.2, step_size=0.05, steps=3), {})
    assert method.name == name
    if not method.adversarial:
        return  # the stage's own cross-entropy step (tests/lightning_modules/test_classifier.py)
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1).train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    step = method.step(model, x, y, progress=0.75)
    assert step.loss.dim() == 0 and torch.isfinite(step.loss) and step.logits.shape == (8, 10)
    assert ((0 <= step.steps) & (step.steps <= 3)).all()
    step.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("dataset", list(DATAMODULES))
def test_every_dataset_loads_or_says_in_one_line_what_to_pass(dataset: str) -> None:
    settings = DataSettings(dataset=dataset, mmd_per_class=2, val_size=20, test_size=20, subset=200)
    options = {"num_train": 200, "image_size": 8} if dataset == "synthetic" else {}
    dm = build_datamodule(settings, 0) if not options else DATAMODULES[dataset](settings, 0, **options)
    try:
        dm.setup()
    except DataError as err:
        assert "--data.root" in str(err) and "\n" not in str(err)
        return
    x, y = dm.split_tensors("test")
    assert x.shape[0] == y.shape[0] == 20 and x.shape[1:] == dm.image_shape
