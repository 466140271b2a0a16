"""``eval.channels_last``: the evaluated networks in channels-last memory format compute the same defense (values,
routing and gradients equal up to the order of floating-point sums), by default on a CPU only."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import Tensor, nn

from dad.attacks.objectives import defense_objective
from evaluation.context import in_memory_format, memory_format
from tests.conftest import tiny_defense


def test_channels_last_is_the_cpu_default_and_a_setting() -> None:
    assert memory_format(None, torch.device("cpu")) == torch.channels_last
    assert memory_format(None, torch.device("meta")) == torch.preserve_format
    assert memory_format(False, torch.device("cpu")) == torch.preserve_format
    assert memory_format(True, torch.device("meta")) == torch.channels_last


def test_a_channels_last_defense_computes_the_same_values_and_gradients() -> None:
    plain = tiny_defense([8], noise_std=0.2)
    plain.routing = "both"
    last = copy.deepcopy(plain).to(memory_format=memory_format(None, torch.device("cpu")))
    conv = [m for m in last.classifier.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    outputs = []
    for defense in (plain, last):
        torch.manual_seed(4)
        z = x.clone().requires_grad_(True)
        values = defense_objective(defense, y, "evade_bpda", 1.0, "ce").draws(z, 2)
        out = defense.forward_draws(x, 3)
        outputs.append((values.detach(), torch.autograd.grad(values.sum(), z)[0], out.logits, out.score, out.flags))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Viewing(nn.Module):
    """A denoiser that ``view``s its activations: it cannot run in channels-last format."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.0 * self.convs(x).view(len(x), -1).mean(1).view(-1, 1, 1, 1)


def test_a_network_that_cannot_run_channels_last_keeps_its_format(caplog: pytest.LogCaptureFixture) -> None:
    """By default such a network stays in its own format (a warning); asked for explicitly, a one-line error."""
    defense = tiny_defense([8])
    probe = torch.rand(2, 1, 8, 8)
    in_memory_format(defense, None, probe)
    assert not all(p.is_contiguous() for p in defense.parameters())  # the tiny defense runs channels-last
    defense.purifier.denoiser = _Viewing()
    defense.to(memory_format=torch.contiguous_format)
    with pytest.raises(RuntimeError):
        copy.deepcopy(defense).to(memory_format=torch.channels_last).purify_runs(probe, 1)
    with caplog.at_level(logging.WARNING, logger="evaluation.context"):
        in_memory_format(defense, None, probe)
    assert "its own memory format" in caplog.text
    assert all(p.is_contiguous() for p in defense.parameters())
    with pytest.raises(ValueError, match="cannot run in channels-last format"):
        in_memory_format(defense, True, probe)
