"""Calibration, scoring and routing on a fake ``cuda`` device: device mixing fails here as it would on a GPU.

:class:`torch._subclasses.fake_tensor.FakeTensorMode` runs on a CPU-only machine: tensors carry a device and a
shape but no data, and an operation on tensors of two devices raises ``FakeTensorDeviceMismatchError`` as CUDA
would. It refuses ``.item()``, boolean masks and ``nonzero`` (their results depend on the data), so what is
checked here is the sync-free tensor work; the parts that read values back are covered by the single-process
DDP run (``tests/pipeline/test_gpu_rules.py``) and the factory-call rule (``tests/dad/test_device_rules.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from dad.attacks.apgd import apgd
from dad.attacks.judging import defense_judge
from dad.attacks.objectives import defense_objective
from dad.attacks.run_stack import strongest_per_group
from dad.defense import DADDefense
from dad.routing import ROUTINGS
from dad.runs import runs_settings
from tests.conftest import tiny_defense

B = 10
CUDA = torch.device("cuda", 0)


def _defense() -> DADDefense:
    """A tiny calibrated defense on the CPU (real tensors), every routing available."""
    return tiny_defense([B])


def to_fake_cuda(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Replace every parameter and buffer of ``module`` by a fake tensor of its shape on ``cuda:0``."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                with mode:
                    sub._parameters[name] = nn.Parameter(param.detach().to(CUDA), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                with mode:
                    sub._buffers[name] = buffer.to(CUDA)
    return module


@pytest.fixture
def fake() -> tuple[FakeTensorMode, DADDefense]:
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # real CPU tensors may enter: mixing them must then fail
    return mode, to_fake_cuda(_defense(), mode)


def test_the_harness_catches_a_cpu_tensor_meeting_a_gpu_one(fake: tuple[FakeTensorMode, DADDefense]) -> None:
    mode, defense = fake
    with mode, pytest.raises(FakeTensorDeviceMismatchError):
        defense.detector.score(torch.rand(B, 1, 8, 8))  # a real CPU batch against the reference on cuda


def test_batch_scores_and_both_calibrations_run_on_the_gpu(fake: tuple[FakeTensorMode, DADDefense]) -> None:
    mode, defense = fake
    with mode, torch.no_grad():
        pool = torch.rand(60, 1, 8, 8, device=CUDA)
        generator = torch.Generator().manual_seed(0)  # CPU draws: the same batches on every device
        scores = defense.detector.batch_scorer(pool)(B, 50, generator)
        batch = defense.detector.estimate(pool, [B], 50, generator)[B]
        both = defense.routers["both"]
        joint = both.estimate(defense.detector, defense.sample_detector, pool, [B], 0.05, 50, generator)[B]
    assert scores.device == CUDA and scores.shape == (50,)
    assert all(t.device == CUDA for t in (batch[0], batch[1], *joint))


@pytest.mark.parametrize("routing", ROUTINGS)
def test_every_routing_decides_on_the_gpu(fake: tuple[FakeTensorMode, DADDefense], routing: str) -> None:
    mode, defense = fake
    defense.routing = routing
    with mode, torch.no_grad():
        x = torch.rand(B, 1, 8, 8, device=CUDA)
        logits, features = defense.classify_with_features(x)
        detection = defense.detect(x, features)
        purified = defense.purify(x)
    tensors: list[Tensor] = [logits, detection.score, detection.flags, purified]
    tensors += [t for t in (detection.batch_excess, detection.sample_excess) if t is not None]
    assert all(t.device == CUDA for t in tensors)
    assert detection.flags.shape == (B,)


@pytest.mark.parametrize("routing", ["batch", "both"])
@pytest.mark.parametrize("objective", ["adaptive", "evade_clean", "evade_denoised", "evade_bpda"])
def test_an_attack_runs_without_host_syncs(monkeypatch: pytest.MonkeyPatch, routing: str, objective: str) -> None:
    """APGD through the defense on a mixed batch, batched EOT, judged over 3 draws, on the accelerator's path (every
    image purified, selected with ``torch.where``): fake tensors refuse every host sync, so the run (its one input
    check aside, made before the loop) reads nothing back from the device. Fake CPU tensors: backward passes need no
    CUDA context."""
    defense = _defense()
    defense.routing = routing
    monkeypatch.setattr(DADDefense, "_purifies_every_image", staticmethod(lambda x: True))
    monkeypatch.setattr("dad.attacks.apgd.check_unit_range", lambda x: None)  # the input check, once per run
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, y, filler = torch.rand(B, 1, 8, 8), torch.randint(0, 10, (B,)), torch.rand(4, 1, 8, 8)
        judge = defense_judge(defense, y, draws=3, filler=filler)
        objective_fn = defense_objective(defense, y, objective, 1.0, filler=filler)
        x_adv = apgd(objective_fn, judge, x, 0.1, steps=3, eot_samples=3, stop_when_settled=False)
        with pytest.raises(Exception):  # the harness: a host sync is refused
            bool(x_adv.sum() > 0)
    assert x_adv.shape == x.shape


@pytest.mark.parametrize("objective", ["adaptive", "evade_clean", "evade_bpda"])
def test_stacked_runs_run_without_host_syncs(monkeypatch: pytest.MonkeyPatch, objective: str) -> None:
    """Three runs of APGD stacked along a leading dimension (per-run weights and losses, each run its own detector
    batch, judged per run) on the accelerator's path: no host sync in the loop, the stack's shape returned."""
    defense = _defense()
    defense.routing = "both"
    monkeypatch.setattr(DADDefense, "_purifies_every_image", staticmethod(lambda x: True))
    monkeypatch.setattr("dad.attacks.apgd.check_unit_range", lambda x: None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, y, filler = torch.rand(B, 1, 8, 8), torch.randint(0, 10, (B,)), torch.rand(4, 1, 8, 8)
        judge = defense_judge(defense, y, draws=3, filler=filler)
        objective_fn = defense_objective(defense, y, objective, (0.0, 1.0, 10.0), ("ce", "dlr", "ce"), filler=filler)
        x_adv = apgd(objective_fn, judge, x, 0.1, steps=3, eot_samples=2, stop_when_settled=False, runs=3)
        with pytest.raises(Exception):
            bool(x_adv.sum() > 0)
    assert x_adv.shape == (3, *x.shape)


def test_groups_run_without_host_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two groups of a mixed batch (their own labels and fillers), two runs each, through APGD, then each group's
    strongest batch chosen (:func:`~dad.attacks.run_stack.strongest_per_group`): no host sync."""
    defense = _defense()
    defense.routing = "both"
    monkeypatch.setattr(DADDefense, "_purifies_every_image", staticmethod(lambda x: True))
    monkeypatch.setattr("dad.attacks.apgd.check_unit_range", lambda x: None)
    with FakeTensorMode(allow_non_fake_inputs=True), runs_settings(early_stop=False, stack_groups=True):
        x, y, filler = torch.rand(2, 3, 1, 8, 8), torch.randint(0, 10, (2, 3)), torch.rand(2, 4, 1, 8, 8)
        judge = defense_judge(defense, y, draws=3, filler=filler)
        objective_fn = defense_objective(defense, y, "evade_clean", (1.0, 10.0) * 2, ("ce", "dlr") * 2, filler=filler)
        stack = apgd(objective_fn, judge, x, 0.1, steps=3, runs=4, groups=2)
        x_adv = strongest_per_group(judge, stack, 2)
        with pytest.raises(Exception):
            bool(x_adv.sum() > 0)
    assert stack.shape == (4, 3, 1, 8, 8) and x_adv.shape == x.shape
