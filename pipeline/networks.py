"""The networks a run's stages produce, each built or loaded once per process and shared by the stages after.

Within one ``train.py pipeline`` the classifier trained by the first stage is the very module the kernel is built
on and the denoiser is trained against; a stage run on its own loads what it needs from the earlier stages'
products (each checkpoint read once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dad.denoisers import UNetDenoiser
from dad.diffusion import DiffusionSchedule, ScoreUNet
from dad.io import sha256_file
from dad.kernels import SemanticKernel
from dad.models import ImageClassifier, freeze
from dad.networks import build_networks
from datamodules import DADDataModule, PairedDataModule
from pipeline.checkpoints import checkpoint_networks, load_into, read_checkpoint, sub_state_dict
from pipeline.config import PipelineConfig
from pipeline.paths import RunPaths

__all__ = ["RunNetworks", "load_classifier", "load_denoiser", "stage_hint"]


def stage_hint(stage: str, cfg: PipelineConfig) -> str:
    """The command that makes ``stage``'s product for this run (for messages about a missing product)."""
    return f"python train.py {stage} --run.name {cfg.run.name} --run.root {cfg.run.root}"


def load_classifier(path: Path, hint: str) -> ImageClassifier:
    """The classifier of a classifier stage's checkpoint ``path`` (this run's, or another run's: the classifier of
    the flagged route, ``defense.flagged_classifier``), not yet frozen; ``hint`` says how to make a missing one."""
    ckpt = read_checkpoint(path, "classifier", hint)
    model, _, _ = build_networks(checkpoint_networks(ckpt))
    load_into(model, sub_state_dict(ckpt["state_dict"], "model"), path)
    return model


def load_denoiser(path: Path, hint: str) -> UNetDenoiser:
    """The denoiser of a denoiser stage's checkpoint ``path`` (this run's, or another run's: a candidate route of
    ``defense.select.denoisers``), frozen; ``hint`` says how to make a missing one."""
    ckpt = read_checkpoint(path, "denoiser", hint)
    _, _, denoiser = build_networks({**checkpoint_networks(ckpt), "kernel": None})
    load_into(denoiser, sub_state_dict(ckpt["state_dict"], "denoiser"), path)
    return freeze(denoiser)


class RunNetworks:
    """The networks a run's stages produce, each built or loaded once per process and shared after.

    Within one ``train.py pipeline`` the classifier trained by the first stage is the very module the
    kernel is built on and the denoiser is trained against; a stage run on its own loads what it needs
    from the earlier stages' products (each checkpoint read once).
    """

    def __init__(self, cfg: PipelineConfig, paths: RunPaths) -> None:
        self.cfg = cfg
        self.paths = paths
        self._classifier: ImageClassifier | None = None
        self._kernel: SemanticKernel | None = None
        self._denoiser: UNetDenoiser | None = None
        self._score: tuple[ScoreUNet, DiffusionSchedule] | None = None

    def _product(self, stage: str) -> dict[str, Any]:
        return read_checkpoint(self.paths.product(stage), stage, stage_hint(stage, self.cfg))

    @property
    def classifier(self) -> ImageClassifier:
        """The trained classifier (frozen)."""
        if self._classifier is None:
            self._classifier = load_classifier(self.paths.product("classifier"), stage_hint("classifier", self.cfg))
        return freeze(self._classifier)

    @classifier.setter
    def classifier(self, model: ImageClassifier) -> None:
        self._classifier = model

    @property
    def classifier_hash(self) -> str:
        """SHA-256 of the classifier product (recorded by the AE caches made against it)."""
        return sha256_file(self.paths.product("classifier"))

    @property
    def kernel(self) -> SemanticKernel:
        """The trained MMD-OPT kernel (frozen); its ``phi`` is :attr:`classifier` itself when they are shared."""
        if self._kernel is None:
            ckpt = self._product("kernel")
            specs = checkpoint_networks(ckpt)
            phi_spec = specs["kernel"]["feature_extractor"]
            phi = self.classifier if phi_spec is None else build_networks({"classifier": phi_spec})[0]
            kernel = SemanticKernel(phi, train_features=specs["kernel"]["train_features"])
            load_into(kernel, sub_state_dict(ckpt["state_dict"], "kernel"), self.paths.product("kernel"))
            self._kernel = kernel
        return freeze(self._kernel)

    @kernel.setter
    def kernel(self, kernel: SemanticKernel) -> None:
        self._kernel = kernel

    @property
    def denoiser(self) -> UNetDenoiser:
        """The denoiser with the weights of the best validation epoch (frozen)."""
        if self._denoiser is None:
            self._denoiser = load_denoiser(self.paths.product("denoiser"), stage_hint("denoiser", self.cfg))
        return freeze(self._denoiser)

    @property
    def score(self) -> tuple[ScoreUNet, DiffusionSchedule]:
        """The trained score network (frozen; the averaged weights when the stage averages them) and its schedule."""
        if self._score is None:
            ckpt = self._product("score")
            specs = checkpoint_networks(ckpt)
            net = ScoreUNet(**specs["score_net"])
            load_into(net, sub_state_dict(ckpt["state_dict"], "net"), self.paths.product("score"))
            self._score = (net, DiffusionSchedule(**specs["schedule"]))
        net, schedule = self._score
        return freeze(net), schedule

    @score.setter
    def score(self, trained: tuple[ScoreUNet, DiffusionSchedule]) -> None:
        self._score = trained

    def keep_best(self, stage: str, network: torch.nn.Module, prefix: str) -> None:
        """Load the weights of ``stage``'s product (its best epoch) into the just-trained ``network`` and keep it."""
        ckpt = self._product(stage)
        load_into(network, sub_state_dict(ckpt["state_dict"], prefix), self.paths.product(stage))
        setattr(self, f"_{stage}", network)

    def paired(self, dm: DADDataModule, train_split: str, val_split: str | None,
               batch_size: int | None) -> PairedDataModule:
        """``(clean, adversarial, label)`` data of the run: the training attack's AEs against :attr:`classifier`,
        cached under the run's ``aes/`` (made in the Trainer's ``setup`` when a Trainer uses it as its data)."""
        return PairedDataModule(dm, self.classifier, self.classifier_hash, self.cfg.attack, self.paths.aes,
                                train_split, val_split, batch_size, self.cfg.data.num_workers)
