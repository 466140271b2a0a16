"""Orthogonal and selective PGD through the defense's detectors (Bryniarski, Hingun, Pachuca, Wang, Carlini,
"Evading Adversarial Example Detection Defenses with Orthogonal Projected Gradient Descent", ICLR 2022,
https://arxiv.org/abs/2106.15023).

The standard attack on a detector + classifier pair. A penalty sum (``evade_clean``: the classifier's loss minus a
weight times the detector's hinge) lets the two gradients fight: a step that fools the classifier may raise the
detector's score and the next undoes it. Instead, each image takes one objective at a time:

* not yet misclassified: ascend the classifier's loss ``f``; **orthogonal** PGD removes from that gradient its
  component along the detector's gradient (the step leaves the detection unchanged to first order);
* misclassified but detected (by the batch test or its own test, whichever are in force): descend the
  detector's loss ``d`` (the hinges ``relu(excess + margin)`` of the tests in force, :mod:`dad.attacks.objectives`);
  orthogonal PGD removes from that gradient its component along the classifier's gradient;
* misclassified and undetected: done, the image stays where it is.

**Selective** PGD takes the same per-image choice without the projections. Both are specs with ``objective:
evade_clean`` (what they aim at; it also tells the sanity checks there is no randomness to average over). The
classifier here is DAD's clean path (the route an undetected image takes), deterministic, so no EOT is needed;
candidates are judged by the real defense on the whole batch over ``draws`` noise draws, the batch it gets most
wrong kept (:mod:`dad.attacks.judging`).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dad.attacks.catalog import register_attack
from dad.attacks.common import (as_autograd_tensor, ascent_step, check_unit_range, gradients_enabled,
                                preserve_mode)
from dad.attacks.judging import Judge, defense_judge, judged_ascent, strongest_run
from dad.attacks.objectives import Losses, excesses_per_image, largest_excess, per_draw_loss
from dad.attacks.run_stack import as_stack, flat_judge, run_starts, stacked_runs, stacks_runs
from dad.attacks.spec import AttackSpec
from dad.defense_runs import KnownRows, classify_runs, stack_rows
from dad.runs import record_passes, run_settings

__all__ = ["orthogonal_direction", "evasion_pgd"]


def _project_out(g: Tensor, onto: Tensor) -> Tensor:
    """``g`` minus its component along ``onto``, per image (rows of zero ``onto`` leave ``g`` as it is)."""
    flat_g, flat_o = g.flatten(1), onto.flatten(1)
    scale = (flat_g * flat_o).sum(1) / (flat_o * flat_o).sum(1).clamp_min(1e-30)
    return (flat_g - scale[:, None] * flat_o).view_as(g)


def orthogonal_direction(grad_f: Tensor, grad_d: Tensor, misclassified: Tensor, detected: Tensor,
                         orthogonal: bool = True) -> Tensor:
    """The ascent direction of each image: ``grad_f`` (the classifier's loss, to raise) where the image is not yet
    misclassified, ``-grad_d`` (the detector's loss, to lower) where it is misclassified but detected, zero where
    it is both misclassified and undetected; with ``orthogonal``, each with its component along the other
    gradient removed."""
    up = _project_out(grad_f, grad_d) if orthogonal else grad_f
    down = -(_project_out(grad_d, grad_f) if orthogonal else grad_d)
    shape = (-1,) + (1,) * (grad_f.dim() - 1)
    fooled, seen = misclassified.view(shape), detected.view(shape)
    return torch.where(~fooled, up, torch.where(seen, down, torch.zeros_like(up)))


def evasion_pgd(defense: nn.Module, judge: Judge, x: Tensor, y: Tensor, spec: AttackSpec, loss: Losses,
                filler: Tensor | None = None, orthogonal: bool = True, known: KnownRows | None = None) -> Tensor:
    """Runs of orthogonal (or selective) PGD on the batch ``x`` (the attacked images of ``cat(x, filler)``;
    ``known``: the filler with its classifier pass made, :meth:`~dad.defense.DADDefense.known_rows`), one per loss
    kind of ``loss`` (a kind: one run), stacked along a leading dimension (:mod:`dad.attacks.run_stack`: each run its
    own detector batch); per run, the judged iterate the defense gets most wrong (a settled one ends the runs).
    Returns ``(B, ...)`` for one run, ``(runs, B, ...)`` for several."""
    check_unit_range(x)
    n, runs, shape = len(y), 1 if isinstance(loss, str) else len(loss), x.shape
    x, start = run_starts(x, spec.eps, spec.norm, spec.random_start, runs)
    judge = flat_judge(judge, runs)

    def step(x_adv: Tensor) -> Tensor:
        x_adv = x_adv.detach().requires_grad_(True)
        record_passes(runs, 1)
        stack = x_adv.view(runs, n, *shape[1:])
        stack = stack_rows(stack, filler if known is None else None)  # looped: the filler passed with every call
        full = stack_rows(stack, None if known is None else known.images)
        logits, features = classify_runs(defense, stack, known)
        # one batch is decided by the defense's own call (any defense with it, e.g. a toy one)
        detection = defense.detect(full, features) if runs > 1 else defense.detect(full[0], features[0])
        excesses = excesses_per_image(detection, n)
        hinges = [F.relu(detection.batch_excess + spec.margin).sum()] if detection.batch_excess is not None else []
        if detection.sample_excess is not None:
            hinges.append(F.relu(detection.sample_excess[..., :n] + spec.margin).sum())
        f = per_draw_loss(logits[None, :, :n], y, loss).sum()
        grad_f = torch.autograd.grad(f, x_adv, retain_graph=True)[0]
        hinge = sum(hinges) if hinges else None  # a fixed routing's hinge is a constant: no gradient to follow
        grad_d = torch.autograd.grad(hinge, x_adv)[0] if hinge is not None and hinge.requires_grad else \
            torch.zeros_like(x_adv)
        misclassified = (logits[:, :n].argmax(-1) != y).flatten()
        detected = (largest_excess(excesses) > 0).flatten() if excesses else torch.zeros_like(misclassified)
        direction = orthogonal_direction(grad_f, grad_d, misclassified, detected, orthogonal)
        return ascent_step(x_adv.detach(), x, direction, spec.eps, spec.step_size, spec.norm)

    return as_stack(judged_ascent(judge, start.clamp(0.0, 1.0), spec.steps, step, runs), runs, shape)


def _attack(spec: AttackSpec, defense: nn.Module, x: Tensor, y: Tensor, filler: Tensor | None,
            orthogonal: bool) -> Tensor:
    if spec.objective != "evade_clean":
        raise ValueError(f"`{spec.name}` evades the detectors into the clean path: set `objective: evade_clean`, "
                         f"got {spec.objective!r}")
    with preserve_mode(defense), gradients_enabled():
        x, y = as_autograd_tensor(x), as_autograd_tensor(y)
        judge = defense_judge(defense, y, spec.draws, filler)
        known = defense.known_rows(filler) if filler is not None and run_settings().batched else None
        run = partial(evasion_pgd, defense, judge, x, y, spec, filler=filler, orthogonal=orthogonal, known=known)
        settings = [(loss, 0.0) for loss in spec.losses for _ in range(spec.restarts)]
        if stacks_runs(defense, spec.objective, len(settings)):
            return stacked_runs(judge, settings, lambda losses, lams: run(losses), x)
        return strongest_run(judge, [partial(run, loss) for loss, _ in settings])


@register_attack("orthogonal_pgd", "defense")
def orthogonal_pgd_attack(spec: AttackSpec, defense: nn.Module, x: Tensor, y: Tensor,
                          filler: Tensor | None = None) -> Tensor:
    """Orthogonal PGD (see the module docstring): one run per ``spec.losses`` term and restart, the strongest batch
    kept."""
    return _attack(spec, defense, x, y, filler, orthogonal=True)


@register_attack("selective_pgd", "defense")
def selective_pgd_attack(spec: AttackSpec, defense: nn.Module, x: Tensor, y: Tensor,
                         filler: Tensor | None = None) -> Tensor:
    """Selective PGD: orthogonal PGD's per-image choice of objective without the projections."""
    return _attack(spec, defense, x, y, filler, orthogonal=False)
