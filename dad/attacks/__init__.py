"""Adversarial attacks on image classifiers and on whole defenses; images in and out are in ``[0, 1]``.

Every attack takes a model mapping images in ``[0, 1]`` to logits (normalisation lives inside the
model), runs it in eval mode and restores each submodule's mode, parameter flags and gradients
afterwards. New tensors follow the inputs' device. Attacks are run from an :class:`AttackSpec` through
the registry (:func:`run_attack`); importing this package registers every attack, one per module.
"""

from dad.attacks import apgd, defense_pgd, orthogonal, square  # noqa: F401  (registration; others below)
from dad.attacks.common import preserve_mode
from dad.attacks.autoattack import autoattack
from dad.attacks.cw import cw_l2
from dad.attacks.mma import mma
from dad.attacks.pgd import pgd, projected_gradient_ascent
from dad.attacks.catalog import list_attacks, register_attack
from dad.attacks.registry import chunk_seed, run_attack, run_seeded, target_of
from dad.attacks.spec import DEFENSE_OBJECTIVES, EVASION_OBJECTIVES, THREATS, AttackSpec, Threat

__all__ = [
    "AttackSpec", "DEFENSE_OBJECTIVES", "EVASION_OBJECTIVES", "THREATS", "Threat", "autoattack", "chunk_seed", "cw_l2",
    "list_attacks", "mma", "pgd", "preserve_mode", "projected_gradient_ascent", "register_attack", "run_attack",
    "run_seeded", "target_of",
]
