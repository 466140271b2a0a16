"""What a flagged image goes through before the classifier: one :class:`Purifier` interface, a registry of kinds.

A purifier maps images in [0, 1] to purified images in [0, 1] with fresh randomness at every call, gives
``count`` independent purifications at once (:meth:`Purifier.runs`: a purifier may share the work that does not
depend on the noise), describes itself as plain data (:meth:`Purifier.spec`, rebuilt by :func:`build_purifier`:
saved defenses never pickle objects), and tells an attack the quantity it keys on, if any
(:meth:`Purifier.adaptive_term`: SSNI's standardised EPS norm). Kinds:

* ``denoiser`` (DAD's): Gaussian noise, then the denoiser trained with MMD-OPT (:class:`DenoiserPurifier`);
* ``identity``: nothing (the backbone alone classifies flagged images; :class:`IdentityPurifier`);
* ``fixed`` and ``ssni``: diffusion purification (:mod:`dad.diffusion.purifiers`).

A new kind is one :class:`Purifier` subclass decorated with :func:`register_purifier` in its own file, imported
where the defense is loaded (:mod:`dad.defense` imports every kind's module).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dad.denoisers import UNetDenoiser
from dad.noise import NOISE_MODES, NoiseMode, add_noise
from dad.runs import run_chunks

__all__ = ["Purifier", "PURIFIERS", "register_purifier", "build_purifier", "DenoiserPurifier", "IdentityPurifier",
           "PurifiedRoute", "purify"]

PURIFIERS: dict[str, type[Purifier]] = {}
"""Every purifier kind by name (filled by :func:`register_purifier`)."""


class Purifier(nn.Module):
    """Images in [0, 1] in, purified images in [0, 1] out, a fresh draw of the purifier's randomness per call."""

    kind: ClassVar[str]

    def runs(self, x: Tensor, count: int) -> Tensor:
        """``count`` independent purifications of ``x``, shape ``(count, *x.shape)``: what ``count`` calls give, in
        the same order (a kind may batch them, :mod:`dad.runs`)."""
        return torch.stack([self(x) for _ in range(count)])

    def spec(self) -> dict[str, Any]:
        """The purifier as plain data (``kind`` and its constructor options, no weights)."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any], checkpoint: bool = False) -> Purifier:
        """A purifier from :meth:`spec`, with initial weights (load a state dict next); ``checkpoint``: gradient
        checkpointing where the purifier has a long differentiable computation (a memory setting, not saved)."""
        raise NotImplementedError

    def adaptive_term(self, x: Tensor) -> Tensor | None:
        """The per-sample quantity this purifier keys on, for an adaptive attack to lower (None: none)."""
        return None


def register_purifier(kind: str) -> Callable[[type[Purifier]], type[Purifier]]:
    """Register a :class:`Purifier` subclass as ``kind`` (a second registration of a kind is an error)."""

    def decorate(cls: type[Purifier]) -> type[Purifier]:
        if kind in PURIFIERS:
            raise ValueError(f"Purifier kind {kind!r} is already registered")
        cls.kind = kind
        PURIFIERS[kind] = cls
        return cls

    return decorate


def build_purifier(spec: dict[str, Any], checkpoint: bool = False) -> Purifier:
    """The purifier :meth:`Purifier.spec` describes, with initial weights; ``ValueError`` for an unknown kind."""
    kind = spec.get("kind")
    if kind not in PURIFIERS:
        raise ValueError(f"unknown purifier kind {kind!r}; expected one of {sorted(PURIFIERS)}")
    return PURIFIERS[kind].from_spec(spec, checkpoint)


def purify(denoiser: nn.Module, x: Tensor, noise_std: float, noise: NoiseMode) -> Tensor:
    """Noise, denoise and clamp to [0, 1]: the path of a batch judged adversarial (training validation too)."""
    return denoiser(add_noise(x, noise_std, noise)).clamp(0.0, 1.0)


@register_purifier("denoiser")
class DenoiserPurifier(Purifier):
    """DAD's purification: Gaussian noise (``noise_std``, ``one_sided`` as published or ``symmetric``), the denoiser,
    a clamp to [0, 1]."""

    def __init__(self, denoiser: nn.Module, noise_std: float = 0.25, noise: NoiseMode = "one_sided") -> None:
        super().__init__()
        if noise_std < 0:
            raise ValueError(f"Expected `noise_std` >= 0, got {noise_std}")
        if noise not in NOISE_MODES:
            raise ValueError(f"Unknown noise mode {noise!r}; expected one of {NOISE_MODES}")
        self.denoiser = denoiser
        self.noise_std = noise_std
        self.noise = noise

    def forward(self, x: Tensor) -> Tensor:
        return purify(self.denoiser, x, self.noise_std, self.noise)

    def runs(self, x: Tensor, count: int) -> Tensor:
        """``count`` purifications of ``x``: the copies of a chunk (:func:`~dad.runs.run_chunks`) go through the
        denoiser as one batch, drawing their noise as one tensor."""
        ones = [1] * (x.dim() - 1)
        chunks = [self(x.repeat(c, *ones)) for c in run_chunks(count, x.shape[0], x[0])]
        return torch.cat(chunks).view(count, *x.shape)

    def spec(self) -> dict[str, Any]:
        config = getattr(self.denoiser, "config", None)
        if not isinstance(config, dict):
            raise ValueError(f"Expected a UNetDenoiser to save, got {type(self.denoiser).__name__}")
        return {"kind": self.kind, "denoiser": dict(config), "noise_std": self.noise_std, "noise": self.noise}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], checkpoint: bool = False) -> Purifier:
        return cls(UNetDenoiser(**spec["denoiser"]), spec["noise_std"], spec["noise"])


@register_purifier("identity")
class IdentityPurifier(Purifier):
    """No purification: flagged images reach the classifier as they are (the backbone alone)."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def runs(self, x: Tensor, count: int) -> Tensor:
        return x.expand(count, *x.shape)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], checkpoint: bool = False) -> Purifier:
        return cls()


class PurifiedRoute(nn.Module):
    """The route of a flagged batch as one network: purify, then classify (logits out).

    What an attacker who gets the batch flagged attacks, and what adversarial training of the denoiser
    (``denoiser.adv_steps``) attacks during training.
    """

    def __init__(self, purifier: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.purifier(x))
