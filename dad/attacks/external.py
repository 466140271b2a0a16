"""Thin wrappers over ``torchattacks`` (Kim 2020, MIT licence) for the attacks it already implements well.

The wrappers fix three things torchattacks does not do for us:

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
import torchattacks
from torch import Tensor, nn
from torchattacks.attack import Attack

from dad.attacks._utils import (
    Model,
    Norm,
    as_autograd_tensor,
    check_at_least_one,
    check_norm,
    check_positive,
    check_unit_range,
    gradients_enabled,
    preserve_mode,
    project,
)

__all__ = ["cw_l2", "autoattack", "AUTOATTACK_VERSIONS"]

_TORCHATTACKS_NORMS = {"linf": "Linf", "l2": "L2"}
_SQUARE_QUERIES = 5000


class _InputDeviceModel(nn.Module):
    """Presents any model to torchattacks, with an empty first parameter on the inputs' device."""

    def __init__(self, model: Model, like: Tensor) -> None:
        super().__init__()
        self.device_anchor = nn.Parameter(like.new_empty(0), requires_grad=False)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


@contextmanager
def _isolated_rng(x: Tensor) -> Iterator[None]:
    """Restore the CPU generator (and that of ``x``'s accelerator) after the block."""
    on_accelerator = x.device.type != "cpu"
    devices = [x.device] if on_accelerator else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type if on_accelerator else None):
        yield


def _run(build: Callable[[nn.Module], Attack], model: Model, x: Tensor, y: Tensor) -> Tensor:
    """Run a torchattacks attack built on the adapted model, with modes, gradients and RNG preserved."""
    check_unit_range(x)
    with preserve_mode(model), gradients_enabled(), _isolated_rng(x):
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)
        # The adapter starts in eval mode: torchattacks then never calls `train()` on the model.
        attack = build(_InputDeviceModel(model, x).eval())
        x_adv = attack(x, y)
    return x_adv.detach().to(x.device).clamp(0.0, 1.0)


def cw_l2(
    model: Model,
    x: Tensor,
    y: Tensor,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 100,
    lr: float = 0.01,
) -> Tensor:
    """Untargeted Carlini-Wagner L2 attack (``torchattacks.CW``; no binary search over ``c``).

    Paper: 'Towards Evaluating the Robustness of Neural Networks' (https://arxiv.org/abs/1608.04644).
    Minimises ``|x' - x|_2^2 + c * max(z_y - max_{j != y} z_j, -kappa)`` with Adam in tanh space and
    returns, per input, the smallest successful perturbation found, or the clean input if none was.

    Args:
        model: maps images in ``[0, 1]`` to logits.
        x: clean images in ``[0, 1]``, shape ``(B, C, H, W)``.
        y: true labels, shape ``(B,)``.
        c: weight of the misclassification term (> 0).
        kappa: required confidence of the misclassification (>= 0).
        steps: Adam steps (>= 1).
        lr: Adam learning rate (> 0).

    Returns:
        Detached adversarial images in ``[0, 1]`` on ``x``'s device.
    """
    check_positive("c", c)
    if not kappa >= 0:
        raise ValueError(f"Expected `kappa` >= 0, got {kappa}")
    check_at_least_one("steps", steps)
    check_positive("lr", lr)
    return _run(lambda m: torchattacks.CW(m, c=c, kappa=kappa, steps=steps, lr=lr), model, x, y)


def _standard_ensemble(model: nn.Module, norm: str, eps: float, n_classes: int, seed: int, steps: int) -> list[Attack]:
    common = {"norm": norm, "eps": eps, "seed": seed, "n_restarts": 1}
    return [
        torchattacks.APGD(model, loss="ce", steps=steps, **common),
        torchattacks.APGDT(model, n_classes=n_classes, steps=steps, **common),
        torchattacks.FAB(model, multi_targeted=True, n_classes=n_classes, steps=steps, **common),
        torchattacks.Square(model, n_queries=_SQUARE_QUERIES, **common),
    ]


def _rand_ensemble(model: nn.Module, norm: str, eps: float, n_classes: int, seed: int, steps: int) -> list[Attack]:
    common = {"norm": norm, "eps": eps, "seed": seed, "n_restarts": 1, "eot_iter": 20, "steps": steps}
    return [torchattacks.APGD(model, loss="ce", **common), torchattacks.APGD(model, loss="dlr", **common)]


AUTOATTACK_VERSIONS: dict[str, Callable[..., list[Attack]]] = {
    "standard": _standard_ensemble,
    "rand": _rand_ensemble,
}
"""AutoAttack presets (Croce & Hein 2020): ``standard`` = APGD-CE, APGD-T, FAB-T, Square (5000 queries);
``rand`` = APGD-CE and APGD-DLR with 20 EOT samples, for randomised defenses."""


def autoattack(
    model: Model,
    x: Tensor,
    y: Tensor,
    norm: Norm | str = "linf",
    eps: float = 8 / 255,
    version: str = "standard",
    n_classes: int = 10,
    seed: int = 0,
    steps: int = 100,
) -> Tensor:
    """AutoAttack ensemble from torchattacks components, run as a cascade on still-robust inputs.

    Paper: 'Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks' (https://arxiv.org/abs/2003.01690). The ensemble is built from ``torchattacks`` APGD,
    APGDT, FAB and Square with the reference settings: ``torchattacks.AutoAttack`` itself runs its
    gradient attacks for only 10 iterations, the reference implementation for 100 (``steps``).

    Args:
        model: maps images in ``[0, 1]`` to logits ``(B, n_classes)``.
        x: clean images in ``[0, 1]``, shape ``(B, C, H, W)``.
        y: true labels, shape ``(B,)``.
        norm: ``"linf"`` or ``"l2"`` (case-insensitive).
        eps: radius of the ball (> 0).
        version: ``"standard"`` or ``"rand"`` (see :data:`AUTOATTACK_VERSIONS`).
        n_classes: number of classes of the model (checked against its logits).
        seed: seed of the attacks' random starts; the global random state is restored afterwards.
        steps: iterations of APGD, APGD-T and FAB (>= 1).

    Returns:
        Detached adversarial images in ``[0, 1]``, within ``eps`` of ``x``, on ``x``'s device; inputs
        no attack could break are returned unchanged.
    """
    norm = check_norm(norm)
    check_positive("eps", eps)
    check_at_least_one("steps", steps)
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"Expected `version` in {tuple(AUTOATTACK_VERSIONS)}, got {version!r}")
    with preserve_mode(model), torch.no_grad():
        width = model(x[:1]).shape[1]
    if width != n_classes:
        raise ValueError(f"Expected `n_classes` equal to the model's number of logits {width}, got {n_classes}")

    def build(adapted: nn.Module) -> Attack:
        attacks = AUTOATTACK_VERSIONS[version](adapted, _TORCHATTACKS_NORMS[norm], eps, n_classes, seed, steps)
        return torchattacks.MultiAttack(attacks)

    x_adv = _run(build, model, x, y)
    return (x + project(x_adv - x, eps, norm)).clamp(0.0, 1.0)
