"""Shared pieces of the attacks: mode bookkeeping, projections, steps and argument checks.

Every attack in this package treats the model as a black box mapping images in ``[0, 1]`` to logits
and must leave it exactly as it found it: the ``training`` flag of every submodule (a frozen
BatchNorm inside a model in train mode stays frozen), the ``requires_grad`` flags and the ``.grad``
of every parameter. :func:`preserve_mode` is the one place that guarantees this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Model = Callable[[Tensor], Tensor]
Norm = Literal["linf", "l2"]

_NORMS: tuple[Norm, ...] = ("linf", "l2")
_L2_FLOOR = 1e-12  # keeps the L2-normalised step finite where the gradient vanishes


@contextmanager
def preserve_mode(*modules: object) -> Iterator[None]:
    """Put models in eval mode with frozen parameters, and restore each submodule's own state after.

    On entry, the ``training`` flag of every submodule and the ``requires_grad`` flag of every
    parameter are recorded; each module is switched to eval (through its own ``eval()``, so custom
    ``train()`` overrides are honoured) and its parameters stop requiring gradients, so that even a
    third-party attack calling ``.backward()`` cannot write into ``param.grad``. On exit (also on an
    exception) every flag is set back one by one. Unlike ``model.train()`` on the whole model, this
    keeps deliberately frozen submodules (e.g. a BatchNorm in eval inside a model in train mode) frozen.

    Args:
        *modules: the models used by the attack; arguments that are not ``nn.Module`` (plain callables)
            are ignored, since they have no mode to change.

    Yields:
        Nothing; the modules are in eval mode with frozen parameters inside the block.
    """
    roots = [m for m in modules if isinstance(m, nn.Module)]
    submodules = {id(s): s for m in roots for s in m.modules()}
    params = {id(p): p for m in roots for p in m.parameters()}
    training = {key: s.training for key, s in submodules.items()}
    requires_grad = {key: p.requires_grad for key, p in params.items()}
    try:
        for module in roots:
            module.eval()
        for param in params.values():
            param.requires_grad_(False)
        yield
    finally:
        for key, module in submodules.items():
            module.training = training[key]
        for key, param in params.items():
            param.requires_grad_(requires_grad[key])


@contextmanager
def gradients_enabled() -> Iterator[None]:
    """Enable autograd inside the block even when the caller runs under ``no_grad`` or ``inference_mode``.

    Attacks need input gradients while evaluation loops (Lightning's ``test_step`` included) usually
    disable them; use :func:`as_autograd_tensor` on tensors that may have been created in inference mode.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def as_autograd_tensor(t: Tensor) -> Tensor:
    """Return ``t`` detached, copied out of inference mode if needed (call inside :func:`gradients_enabled`)."""
    return t.clone().detach() if t.is_inference() else t.detach()


def check_norm(norm: str) -> Norm:
    """Return the canonical (lower-case) name of a threat model, accepting ``"Linf"`` / ``"L2"`` spellings."""
    canonical = norm.lower() if isinstance(norm, str) else norm
    if canonical not in _NORMS:
        raise ValueError(f"Expected `norm` in {_NORMS} (any case), got {norm!r}")
    return canonical


def check_positive(name: str, value: float) -> None:
    """Raise if ``value`` is not a number strictly greater than zero."""
    if not value > 0:
        raise ValueError(f"Expected `{name}` > 0, got {value}")


def check_at_least_one(name: str, value: int) -> None:
    """Raise if ``value`` is not an integer >= 1 (step and sample counts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be an integer >= 1, got {value!r}")


def check_unit_range(x: Tensor) -> None:
    """Raise if ``x`` has values outside ``[0, 1]`` (the attacks' input contract; normalise inside the model)."""
    low, high = x.min().item(), x.max().item()
    if low < 0.0 or high > 1.0:
        raise ValueError(f"Expected images in [0, 1] (normalisation belongs inside the model), got [{low}, {high}]")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(B,)`` tensor so that it broadcasts against ``like`` of shape ``(B, ...)``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _l2_norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(p=2, dim=1)


def project(delta: Tensor, eps: float, norm: Norm) -> Tensor:
    """Project per-sample perturbations onto the ``eps``-ball of the given norm.

    Args:
        delta: perturbations of shape ``(B, ...)``.
        eps: radius of the ball.
        norm: ``"linf"`` (clip every coordinate) or ``"l2"`` (rescale samples whose L2 norm exceeds ``eps``).

    Returns:
        Tensor of the shape of ``delta``, each sample inside the ball.
    """
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / _l2_norms(delta).clamp_min(_L2_FLOOR)).clamp(max=1.0)
    return delta * _per_sample(scale, delta)


def normalized_step(grad: Tensor, norm: Norm) -> Tensor:
    """Steepest-ascent direction of unit size in the given norm.

    Linf: the sign of the gradient; L2: the gradient divided by its per-sample L2 norm (zero where
    the gradient is zero).
    """
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample(_l2_norms(grad).clamp_min(_L2_FLOOR), grad)


def ascent_step(x_adv: Tensor, x: Tensor, grad: Tensor, eps: float, step_size: float, norm: Norm,
                noise: Tensor | None = None) -> Tensor:
    """One step of projected gradient ascent: ``step_size`` along the normalised gradient (plus ``noise``, FAT's
    Gaussian term), then back onto the ``eps``-ball around ``x`` and into ``[0, 1]``. The step of every PGD loop
    (the attacks' and adversarial training's)."""
    moved = x_adv + step_size * normalized_step(grad, norm)
    if noise is not None:
        moved = moved + noise
    return (x + project(moved - x, eps, norm)).clamp(0.0, 1.0)


def random_delta(x: Tensor, eps: float, norm: Norm, generator: torch.Generator | None = None) -> Tensor:
    """Random starting perturbation inside the ``eps``-ball (before clamping the image to ``[0, 1]``).

    Linf: uniform in the cube. L2: a uniformly random direction (normalised Gaussian) scaled by a radius
    drawn uniformly from ``[0, eps]``.
    """
    if norm == "linf":
        uniform = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return (2.0 * uniform - 1.0) * eps
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    direction = direction / _per_sample(_l2_norms(direction).clamp_min(_L2_FLOOR), x)
    radius = eps * torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device)
    return direction * _per_sample(radius, x)


@dataclass
class WarmStart:
    """AEs an attack's runs start from instead of a random point (:func:`starting_from`); ``used`` says whether an
    attack did."""

    points: Tensor
    used: bool = False


_WARM_START: ContextVar[WarmStart | None] = ContextVar("warm_start", default=None)


@contextmanager
def starting_from(points: Tensor | None) -> Iterator[WarmStart | None]:
    """Attacks in the block start every run from ``points`` (AEs of the same clean batch, e.g. another run's
    result: that run continued for more steps) instead of a random point of the ball; None changes nothing. The
    caller checks :attr:`WarmStart.used` afterwards: an attack that cannot start from given points ignores them."""
    warm = None if points is None else WarmStart(points)
    token = _WARM_START.set(warm)
    try:
        yield warm
    finally:
        _WARM_START.reset(token)


def warm_start(x: Tensor, eps: float, norm: Norm) -> Tensor | None:
    """The warm start in force (:func:`starting_from`) for an attack on ``x``, projected onto the ``eps``-ball
    around ``x`` and into ``[0, 1]`` (marked used); None outside such a block."""
    warm = _WARM_START.get()
    if warm is None:
        return None
    if warm.points.shape != x.shape:
        raise ValueError(f"Expected a warm start of the batch's shape {tuple(x.shape)}, got {tuple(warm.points.shape)}")
    warm.used = True
    return (x + project(warm.points.to(x) - x, eps, norm)).clamp(0.0, 1.0)


def start_point(x: Tensor, eps: float, norm: Norm, random_start: bool,
                generator: torch.Generator | None = None) -> Tensor:
    """Where a run of a gradient attack on ``x`` starts: the :func:`warm_start` in force, else ``x`` plus a random
    perturbation (:func:`random_delta`, not yet clamped) or ``x`` itself."""
    warm = warm_start(x, eps, norm)
    if warm is not None:
        return warm
    return x + random_delta(x, eps, norm, generator) if random_start else x


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """CW-style margin ``max_{j != y} z_j - z_y`` per sample; positive means misclassified.

    Args:
        logits: tensor of shape ``(B, K)``.
        y: true labels of shape ``(B,)``.

    Returns:
        Tensor of shape ``(B,)``.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - true
