"""AutoAttack's ``rand`` version (APGD-CE, then APGD-DLR, both with EOT) on whole batches.

Paper: 'Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks' (Croce & Hein 2020, https://arxiv.org/abs/2003.01690); the APGD iterations are torchattacks'
(Kim 2020, MIT licence).

Why not :func:`dad.attacks.autoattack` with ``version="rand"``: torchattacks attacks only the inputs
still classified correctly (``APGD.perturb`` and ``MultiAttack`` slice the batch), so a batch-level
defense such as DAD would be queried on sub-batches of varying size, whose routing and threshold differ
from the evaluated batch's (and a single remaining image cannot be scored at all). Here every query is
the whole batch: ``APGD.attack_single_run`` optimises all images jointly, and the two runs are merged
per image (CE's AE where it succeeded, else DLR's where that did, else CE's highest-loss iterate).
"""

from __future__ import annotations

import torch
import torchattacks
from torch import Tensor, nn

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
from dad.attacks.registry import register_attack
from dad.attacks.spec import AttackSpec
from dad.attacks.torchattacks_adapter import TORCHATTACKS_NORMS, InputDeviceModel, isolated_rng

__all__ = ["apgd_rand", "RAND_LOSSES", "autoattack_rand_attack"]

RAND_LOSSES = ("ce", "dlr")


def apgd_rand(
    model: Model,
    x: Tensor,
    y: Tensor,
    norm: Norm | str = "linf",
    eps: float = 8 / 255,
    steps: int = 100,
    eot_samples: int = 20,
    seed: int = 0,
) -> Tensor:
    """APGD-CE and APGD-DLR with EOT, every model call on the whole batch ``x``.

    Args:
        model: maps a batch in [0, 1] to logits, possibly randomised and deciding per batch.
        x: clean images in [0, 1], shape ``(B, C, H, W)``, B >= 2 for DLR's sorted logits.
        y: true labels.
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the ball (> 0).
        steps: APGD iterations per loss (>= 1); the reference uses 100.
        eot_samples: gradients averaged per iteration (>= 1); AutoAttack's ``rand`` uses 20.
        seed: seed of the random starts; the global random state is restored afterwards.

    Returns:
        Detached AEs in [0, 1] within ``eps`` of ``x``. Modes, parameter flags and gradients of the model
        are restored.
    """
    norm = check_norm(norm)
    check_positive("eps", eps)
    check_at_least_one("steps", steps)
    check_at_least_one("eot_samples", eot_samples)
    check_unit_range(x)
    with preserve_mode(model), gradients_enabled(), isolated_rng(x):
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)
        adapted = InputDeviceModel(model, x).eval()
        merged, fooled = x.clone(), torch.zeros(len(y), dtype=torch.bool, device=x.device)
        for i, loss in enumerate(RAND_LOSSES):
            torch.manual_seed(seed)
            attack = torchattacks.APGD(adapted, norm=TORCHATTACKS_NORMS[norm], eps=eps, steps=steps, n_restarts=1,
                                       seed=seed, loss=loss, eot_iter=eot_samples)
            highest_loss, robust, _, last_fooling = attack.attack_single_run(x, y)
            success = ~robust.bool().to(x.device)
            candidate = torch.where(success.view(-1, *([1] * (x.dim() - 1))), last_fooling, highest_loss)
            take = torch.ones_like(fooled) if i == 0 else success & ~fooled
            merged[take] = candidate[take].detach()
            fooled |= success
    return (x + project(merged - x, eps, norm)).clamp(0.0, 1.0).detach()


@register_attack("autoattack", "defense")
def autoattack_rand_attack(spec: AttackSpec, defense: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """AutoAttack's ``rand`` version through the defense, on whole batches."""
    return apgd_rand(defense, x, y, spec.norm, spec.eps, spec.steps, spec.eot_samples, spec.seed)
