"""The evaluation's sanity phase: gradient, randomness and strength checks, the eps sweep, and the folding.

The strongest full-white-box attack of the primary threat model (that of the first full-white-box attack, or
``eval.sanity_attack``) is re-run on the first ``eval.sanity_samples`` test images with twice the steps (its AEs of
the main run continued for as many steps again: half the cost of a run from scratch), twice the EOT samples (when
its gradient passes through randomness; else the strongest attack that needs EOT is), another random restart, at
other ``eps`` (:func:`dad.sanity.attack_checks`) and, for a detector-evasion attack with a penalty schedule, with
ten times its largest weight added to the schedule. Where a stronger variant finds errors that no full-set attack
found on those images, its result is *folded* into the worst case: the headline of the threat model becomes the
lower of the full-set figure and the subset's union over every attack and variant
(:func:`evaluation.analysis.worst_cases`). The same attack's AEs on that subset are also judged again with twice
the draws (:func:`check_more_draws`): more purification runs must not find errors beyond noise that the ``R``-draw
rule missed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from dad.attacks import EVASION_OBJECTIVES, AttackSpec, chunk_seed
from dad.attacks.common import margin
from dad.attacks.registry import seeded
from dad.sanity import (
    CheckResult, attack_checks, attack_variants, check_at_least_as_strong, check_gradients, check_randomness,
    check_unchanged, is_randomized,
)
from evaluation.analysis import fraction, threat_groups, threat_label, union

__all__ = ["SanityOutcome", "run_sanity", "check_more_draws"]

Runner = Callable[[Mapping[str, AttackSpec], int, Mapping[str, str]], dict[str, dict[str, Tensor]]]
"""``run(attacks, n, starts)`` -> ``{"dad": {name: correct}, "undefended": {name: correct}}`` on the first ``n``
images; an attack named in ``starts`` starts from the main evaluation's AEs of the attack it maps to."""
SanityOutcome = tuple[dict[str, CheckResult], dict[str, Any], dict[str, dict[str, Any]]]


def _defense_checks(defense: nn.Module, probes: tuple[Tensor, Tensor, Tensor], specs: Mapping[str, AttackSpec],
                    threats: Mapping[str, str], dad: Mapping[str, Tensor],
                    z: float) -> tuple[dict[str, CheckResult], bool]:
    """Gradients, randomness and EOT on the probes (both routes), and white box vs classifier-only per threat
    model; also whether the defense is randomised."""
    clean, adversarial, labels = probes
    checks: dict[str, CheckResult] = {}
    white = [n for n in specs if threats[n] == "defense"]
    checks["gradients"] = check_gradients(lambda x: margin(defense(x), labels[: len(x)]), [clean, adversarial])
    needs_eot = {n: specs[n].eot_samples for n in white if specs[n].needs_eot}
    checks["randomness_eot"] = check_randomness(defense, [clean, adversarial], needs_eot)
    compared = []
    for label, g in threat_groups(specs, threats).items():
        if g["defense"] and g["classifier"]:  # on the images both kinds attacked (a common prefix)
            both = union([union([dad[n] for n in g["defense"]]), union([dad[n] for n in g["classifier"]])])
            n = both.numel()
            compared.append(check_at_least_as_strong(f"{label}: worst case white box vs classifier-only (DAD)",
                                                     union([dad[m][:n] for m in g["defense"]]),
                                                     union([dad[m][:n] for m in g["classifier"]]), z))
    checks["white_box_stronger"] = (
        CheckResult(all(c.passed for c in compared), "; ".join(c.detail for c in compared)) if compared
        else CheckResult(False, "not run: no threat model has both a full-white-box and a classifier-only attack"))
    return checks, is_randomized(defense, [clean, adversarial])


def _fold(specs: Mapping[str, AttackSpec], dad: Mapping[str, Tensor], base: AttackSpec, n_sub: int,
          stronger: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """The re-runs that found more, folded into the worst case of the re-run attack's threat model."""
    label = threat_label(base)
    same_threat = [n for n, s in specs.items() if threat_label(s) == label]
    base_union = union([dad[n][:n_sub] for n in same_threat])
    folded_union = union([base_union, *stronger.values()])
    return {label: {"correct": folded_union, "attacks": [*same_threat, *stronger],
                    "extra_errors": int((base_union & ~folded_union).sum())}}


def run_sanity(
    defense: nn.Module,
    probes: tuple[Tensor, Tensor, Tensor],
    specs: Mapping[str, AttackSpec],
    threats: Mapping[str, str],
    dad: Mapping[str, Tensor],
    num_classes: int,
    run: Runner,
    sanity_attack: str | None,
    sanity_samples: int,
    batch_size: int,
    sweep_factors: list[float],
    z: float,
) -> SanityOutcome:
    """The sanity checks, the eps sweep (for the report and its plot) and the folding per threat model.

    Long because every re-run (more steps, EOT samples, restarts, the eps sweep) is planned here and run in one
    evaluation, then read back by the checks.

    Args:
        defense: the defense under evaluation.
        probes: ``(clean batch, an adversarial batch of the same images, their labels)`` for the gradient and
            randomness checks (a defense may be random on one route only: both routes are probed).
        specs, threats: the whole-batch attacks and their threats; ``dad`` DAD's per-sample correctness.
        num_classes: for the chance level of the eps sweep.
        run: runs attacks on a prefix of the test split (resumable, like the main evaluation).
        sanity_attack: the attack to re-run (None: the strongest full-white-box one of the primary threat).
        sanity_samples: test images of the re-runs (rounded up to whole batches, at most the attacked ones).
        batch_size: the evaluation's batch size.
        sweep_factors: eps multiples of the sweep; ``z``: noise level of the comparisons.
    """
    checks, randomized = _defense_checks(defense, probes, specs, threats, dad, z)
    white = [n for n in specs if threats[n] == "defense"]
    if not white:
        checks["attack_strength"] = CheckResult(False, "not run: no full-white-box attack configured")
        return checks, {}, {}

    primary = [n for n in white if threat_label(specs[n]) == threat_label(specs[white[0]])]
    name = sanity_attack or min(primary, key=lambda n: fraction(dad[n]))
    base = specs[name]
    n_sub = min(math.ceil(sanity_samples / batch_size) * batch_size, min(dad[n].numel() for n in white))
    variants = {run_: f"sanity__{name}__eps{run_[0]:g}_steps{run_[1]}_eot{run_[2]}_seed{run_[3]}"
                for run_ in attack_variants(sweep_factors, randomized and base.needs_eot)[1:]}
    classifier_attack = next((n for n, s in specs.items() if threats[n] == "classifier" and s.name == "pgd"
                              and s.norm == base.norm), None)
    sweep_base = specs[classifier_attack] if classifier_attack else AttackSpec(
        name="pgd", threat="classifier", norm=base.norm, eps=base.eps, step_size=base.step_size, steps=base.steps,
        seed=base.seed)
    sweep_names = {f: f"sweep__classifier__eps{f:g}" for f in sorted({*sweep_factors, 1.0})}
    more_steps = variants[(1.0, 2, 1, 0)]  # continues the main run's AEs: ``steps`` more steps, 2x in all
    runs = {v: base if v == more_steps else base.scaled(*run_) for run_, v in variants.items()}
    runs |= {v: sweep_base.scaled(f * base.eps / sweep_base.eps) for f, v in sweep_names.items()}
    eot_name = None
    if randomized and not base.needs_eot:  # the EOT check then runs on the strongest attack that needs EOT
        eot_name = min((n for n in white if specs[n].needs_eot), key=lambda n: fraction(dad[n]), default=None)
    if eot_name is not None:
        runs[f"sanity__{eot_name}__eot_x2"] = specs[eot_name].scaled(eot_factor=2)
    heavier = _heavier_penalties(base)
    if heavier is not None:
        runs[f"sanity__{name}__lambdas_x10"] = heavier
    extra = run(runs, n_sub, {more_steps: name})

    def robust(eps_factor: float, steps_factor: int, eot_factor: int, seed_offset: int) -> Tensor:
        run_ = (eps_factor, steps_factor, eot_factor, seed_offset)
        return dad[name][:n_sub] if run_ == (1.0, 1, 1, 0) else extra["dad"][variants[run_]]

    strength, sweep = attack_checks(robust, num_classes, base.eps, sweep_factors, randomized and base.needs_eot, z)
    checks |= {key: CheckResult(c.passed, f"{name}: {c.detail}") for key, c in strength.items()}
    checks["more_steps"] = CheckResult(checks["more_steps"].passed, f"{checks['more_steps'].detail} (its AEs "
                                       f"continued for {base.steps} more steps)")
    stronger = [v for run_, v in variants.items() if run_[0] == 1.0]
    if eot_name is not None:
        more_eot = check_unchanged("2x EOT samples", dad[eot_name][:n_sub],
                                   extra["dad"][f"sanity__{eot_name}__eot_x2"], z)
        checks["more_eot"] = CheckResult(more_eot.passed, f"{eot_name} (the strongest attack needing EOT; {name} "
                                         f"does not): {more_eot.detail}")
        stronger.append(f"sanity__{eot_name}__eot_x2")

    if heavier is not None:
        key = f"sanity__{name}__lambdas_x10"
        more = check_unchanged(f"penalty weights {heavier.lambdas}", dad[name][:n_sub], extra["dad"][key], z)
        checks["more_lambdas"] = CheckResult(more.passed, f"{name}: {more.detail}")
        stronger.append(key)

    folded = _fold(specs, dad, base, n_sub, {v: extra["dad"][v] for v in stronger})
    eps = sorted(sweep)
    sweep_report = {
        "attack": name, "classifier_attack": classifier_attack or "pgd (derived from the white-box attack)",
        "norm": base.norm, "n": n_sub, "eps": [f * base.eps for f in eps],
        "dad_white_box": [fraction(sweep[f]) for f in eps],
        "dad_classifier_only": [fraction(extra["dad"][sweep_names[f]]) for f in eps],
        "undefended": [fraction(extra["undefended"][sweep_names[f]]) for f in eps],
    }
    return checks, sweep_report, folded


def _heavier_penalties(spec: AttackSpec) -> AttackSpec | None:
    """An evasion attack with its penalty schedule extended by ten times its largest weight (a detector that only
    a larger weight evades is otherwise reported as unevaded); None for an attack without a schedule."""
    if spec.objective not in EVASION_OBJECTIVES or not spec.lambdas:
        return None
    return replace(spec, lambdas=[*spec.lambdas, 10.0 * (max(spec.lambdas) or 1.0)])


@torch.no_grad()
def check_more_draws(defense: nn.Module, attack: str, spec: AttackSpec, batches: Mapping[int, Mapping[str, Tensor]],
                     labels: Tensor, n: int, draws: int, z: float) -> CheckResult:
    """Judge an attack's stored AEs on the first ``n`` test images again with ``2 * draws`` purification runs.

    Each batch is judged with the evaluation's own seed, so its first ``draws`` runs repeat the recorded ones and
    the others are new: the new verdict is the recorded one and ``draws`` more runs, a paired comparison. Fewer
    robust samples beyond noise mean ``draws`` runs were too few to see the defense's randomness.

    Args:
        defense: the evaluated defense (with ``forward_draws``).
        attack: the attack's name (for the message); ``spec`` its settings (its seed seeds the judging).
        batches: the attack's records by batch index (``index``, ``x_adv``, ``dad`` per sample).
        labels: the labels of the test split, indexed by the records' ``index``.
        n: how many of the first test images to judge again (whole batches).
        draws: the evaluation's draws per judgement.
        z: noise level of the comparison.
    """
    device = next(defense.parameters()).device
    recorded, again = [], []
    for batch_idx in sorted(batches):
        record = batches[batch_idx]
        if int(record["index"].max()) >= n:
            continue
        x, y = record["x_adv"].to(device), labels[record["index"]].to(device)
        with seeded(chunk_seed(spec.seed, batch_idx, stream=1), x):
            predicted = defense.forward_draws(x, 2 * draws).logits.argmax(2)
        recorded.append(record["dad"].bool().cpu())
        again.append((predicted == y).all(0).cpu())
    if not recorded:
        return CheckResult(False, f"not run: no stored batch of {attack} lies within the first {n} images")
    result = check_unchanged(f"{2 * draws} instead of {draws} purification runs", torch.cat(recorded),
                             torch.cat(again), z)
    return CheckResult(result.passed, f"{attack}: {result.detail}")
