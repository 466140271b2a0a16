"""Running ``torchattacks`` (Kim 2020, MIT licence) attacks safely, for the attacks it already implements well.

The adapter fixes three things torchattacks does not do for us:

* modes: torchattacks switches the whole model to eval and back with ``model.train()``, which unfreezes
  deliberately frozen submodules; here the attack runs inside :func:`~dad.attacks.preserve_mode`, which
  restores every submodule's own flag, and parameters are frozen so its ``.backward()`` calls (CW, FAB)
  cannot write into ``param.grad``;
* devices: torchattacks reads the device from the model's first parameter (and prints a warning for
  models without one); the model is presented through an adapter whose first parameter is an empty
  tensor on the input's device, so any callable model works on any device;
* global random state: the AutoAttack components reseed the global generators; the previous state is
  restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torchattacks.attack import Attack

from dad.attacks.common import Model, as_autograd_tensor, check_unit_range, gradients_enabled, preserve_mode

__all__ = ["InputDeviceModel", "isolated_rng", "run_torchattacks", "TORCHATTACKS_NORMS"]

TORCHATTACKS_NORMS = {"linf": "Linf", "l2": "L2"}


class InputDeviceModel(nn.Module):
    """Presents any model to torchattacks, with an empty first parameter on the inputs' device."""

    def __init__(self, model: Model, like: Tensor) -> None:
        super().__init__()
        self.device_anchor = nn.Parameter(like.new_empty(0), requires_grad=False)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


@contextmanager
def isolated_rng(x: Tensor) -> Iterator[None]:
    """Restore the CPU generator (and that of ``x``'s accelerator) after the block."""
    on_accelerator = x.device.type != "cpu"
    devices = [x.device] if on_accelerator else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type if on_accelerator else None):
        yield


def run_torchattacks(build: Callable[[nn.Module], Attack], model: Model, x: Tensor, y: Tensor) -> Tensor:
    """Run a torchattacks attack built on the adapted model, with modes, gradients and RNG preserved."""
    check_unit_range(x)
    with preserve_mode(model), gradients_enabled(), isolated_rng(x):
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)
        # The adapter starts in eval mode: torchattacks then never calls `train()` on the model.
        attack = build(InputDeviceModel(model, x).eval())
        x_adv = attack(x, y)
    return x_adv.detach().to(x.device).clamp(0.0, 1.0)
