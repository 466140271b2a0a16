"""Adversarial attacks on image classifiers; images in and out are in ``[0, 1]``.

Every attack takes a model mapping images in ``[0, 1]`` to logits (normalisation lives inside the
model), runs it in eval mode and restores each submodule's mode, parameter flags and gradients
afterwards. New tensors follow the inputs' device.
"""

from collections.abc import Callable

from torch import Tensor

from dad.attacks._utils import preserve_mode
from dad.attacks.external import autoattack, cw_l2
from dad.attacks.mma import mma
from dad.attacks.pgd import pgd, projected_gradient_ascent

__all__ = ["ATTACKS", "autoattack", "cw_l2", "mma", "pgd", "preserve_mode", "projected_gradient_ascent"]

ATTACKS: dict[str, Callable[..., Tensor]] = {
    "pgd": pgd,
    "mma": mma,
    "cw_l2": cw_l2,
    "autoattack": autoattack,
}
"""Attacks by name, each called as ``attack(model, x, y, **settings)``; presets name one and its settings."""
