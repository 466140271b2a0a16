"""Attacks run through a Trainer over the test images (resumable, sharded by batch under DDP), and the source
model transfer attacks are crafted on."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import AttackStateWriter, BatchesOnDevice, ProgressLog
from dad.attacks import AttackSpec
from dad.defense_file import load_defense
from dad.io import atomic_torch_save, sha256_file
from dad.models import create_model, freeze, load_classifier_weights
from dad.runs import runs_settings
from datamodules import DADDataModule
from datamodules.sampling import ShardedBatchSampler
from evaluation.context import Context, in_memory_format
from evaluation.crafted import CraftedStore, module_digest
from evaluation.state import AttackState, state_key
from lightning_modules.classifier import ClassifierModule, ClassifierSettings
from lightning_modules.evaluator import CLEAN, DefenseEvaluator
from pipeline.config import PipelineConfig
from pipeline.eval_settings import TransferSettings
from pipeline.trainer import FP32, trainer_arguments

__all__ = ["run_attacks", "transfer_defenses", "transfer_source", "trainer_kwargs", "mixed_name", "TRANSFER_PREFIX"]

log = logging.getLogger(__name__)

TRANSFER_PREFIX = "transfer_"


def mixed_name(attack: str, fraction: float) -> str:
    """The name of attack ``attack`` run on mixed batches with a share ``fraction`` of AEs."""
    return f"mixed_{attack}_{fraction:g}"


def trainer_kwargs(cfg: PipelineConfig) -> dict[str, Any]:
    """The run's Trainer settings, without the batch limits of training, in float32 whatever precision the run
    trained in (attacks and judgements are reported in float32)."""
    return {**{k: v for k, v in trainer_arguments(cfg.trainer).items()
               if not k.startswith("limit_") and k not in ("logger", "callbacks")}, **FP32}


def run_attacks(ctx: Context, attacks: Mapping[str, AttackSpec], n: int,
                sources: Mapping[str, tuple[nn.Module, str]] | None = None, with_clean: bool = False,
                mixed: Mapping[str, tuple[AttackSpec, float]] | None = None,
                callbacks: list[Callback] | None = None,
                starts: Mapping[str, AttackState] | None = None) -> DefenseEvaluator:
    """Run attacks (and mixed-batch attacks) over the first ``n`` test images, resuming saved states; an attack of
    ``starts`` starts its runs from that state's AEs (its own state keyed by that state's key too)."""
    sources, mixed, starts = dict(sources or {}), dict(mixed or {}), dict(starts or {})
    names = [CLEAN] * with_clean + list(attacks) + list(mixed)
    states = {}
    for name in names:
        if name == CLEAN:
            config: Any = "clean"
        elif name in mixed:
            config = {"attack": mixed[name][0].as_dict(), "fraction": mixed[name][1]}
        else:
            config = attacks[name].as_dict()
        key = state_key(attack=config, source=sources[name][1] if name in sources else None, draws=ctx.cfg.eval.draws,
                        **ctx.key_parts, **({"start": starts[name].key} if name in starts else {}))
        states[name] = AttackState.resume(ctx.state_path(name), key) if ctx.cfg.eval.resume else AttackState(key)
        if states[name].batches:
            log.info("%s: %d batches reused from %s", name, len(states[name].batches), ctx.state_path(name))
    # a classifier-only mixed attack judges the AEs of the same attack on whole batches: the same crafted store
    alone = {name: spec for name, (spec, _) in mixed.items() if spec.threat == "classifier"}
    crafted = crafted_stores(ctx, {**attacks, **alone}, sources)
    module = DefenseEvaluator(ctx.defense, attacks, states=states, with_clean=with_clean,
                              sources={name: model for name, (model, _) in sources.items()}, batch_size=ctx.batch_size,
                              draws=ctx.cfg.eval.draws, mixed=mixed, filler=(ctx.fpr_pool, ctx.fpr_labels),
                              crafted=crafted, starts=starts)
    writer = AttackStateWriter({name: ctx.state_path(name) for name in names})
    progress = ProgressLog("attacks" if with_clean else "attacks through the defense" if mixed else "sanity re-runs")
    trainer = pl.Trainer(
        default_root_dir=str(ctx.paths.root), logger=ctx.logger, callbacks=[writer, progress, *(callbacks or [])],
        inference_mode=False, use_distributed_sampler=False, enable_checkpointing=False, **trainer_kwargs(ctx.cfg),
    )
    # whole batches per rank, no padding: every test sample is counted exactly once under DDP
    data = TensorDataset(ctx.x[:n], ctx.y[:n], torch.arange(n))
    loader = DataLoader(data, batch_sampler=ShardedBatchSampler(n, ctx.batch_size))
    log.info("evaluating %s on %d test images", ", ".join(names), n)
    with runs_settings(max_images=ctx.cfg.eval.max_run_images):
        trainer.test(module, dataloaders=loader, verbose=False)
    ctx.defense.to(ctx.device)  # the teardown moved it back to the CPU: the analysis runs on the run's device
    for name, store in crafted.items():
        if store.reads:
            made = "the same attack on whole batches" if name in alone else "an earlier evaluation of this run"
            log.info("%s: the AEs of %d batches read from %s (crafted by %s)", name, store.reads, store.folder, made)
    return module


def crafted_stores(ctx: Context, attacks: Mapping[str, AttackSpec],
                   sources: Mapping[str, tuple[nn.Module, str]]) -> dict[str, CraftedStore]:
    """The crafted-AE store (:mod:`evaluation.crafted`) of every attack that does not see the defense: a
    classifier-only attack, keyed by the classifier's weights, and a transfer attack, by its source's hash."""
    classifier: str | None = None  # the classifier's digest, computed once where needed
    targets = {}
    for name, spec in attacks.items():
        if name in sources:
            targets[name] = sources[name][1]
        elif spec.threat == "classifier":
            classifier = classifier or module_digest(ctx.defense.classifier)
            targets[name] = classifier
    shared = {part: ctx.key_parts[part] for part in ("split", "batch_size", "protocol")}  # not the defense's parts
    return {name: CraftedStore(ctx.paths.root / "crafted_aes",
                               state_key(attack=attacks[name].as_dict(), target=target, **shared),
                               read=ctx.cfg.eval.resume)
            for name, target in targets.items()}


def transfer_defenses(ctx: Context, spec: TransferSettings) -> dict[str, tuple[nn.Module, str]]:
    """The other defenses attacks through the defense are crafted on, by name, on the run's device, each with its
    file's hash (what the attack states are keyed by)."""
    sources = {}
    for name, path in spec.defenses.items():
        source = load_defense(path, map_location=ctx.device, checkpoint=ctx.cfg.eval.purifier_checkpointing)
        in_memory_format(source, ctx.cfg.eval.channels_last, ctx.fpr_pool[:2].to(ctx.device))
        if source.image_shape != ctx.defense.image_shape:
            raise ValueError(f"`eval.transfer.defenses.{name}` ({path}) takes images of shape {source.image_shape}, "
                             f"this defense {ctx.defense.image_shape}")
        sources[name] = (source, sha256_file(path))
    return sources


def transfer_source(ctx: Context, dm: DADDataModule, spec: TransferSettings) -> tuple[nn.Module, str]:
    """The model transfer AEs are crafted on: given weights, or a quick training (cached in eval_state/)."""
    classifier = ctx.defense.specs["classifier"]
    name = spec.model or classifier["name"]
    base = classifier.get("kwargs", {}) if spec.model is None else {
        k: v for k, v in classifier.get("kwargs", {}).items() if k in ("num_classes", "in_channels")}
    kwargs = {**base, **spec.model_kwargs}
    num_classes = kwargs.pop("num_classes", dm.num_classes)
    if spec.weights:
        model = create_model(name, num_classes=num_classes, **kwargs)
        load_classifier_weights(model, spec.weights)
        return freeze(model), sha256_file(spec.weights)
    own = {k: v for k, v in asdict(spec).items() if k not in ("defenses", "defense_attacks")}  # the source's settings
    key = state_key(transfer=own, model=name, kwargs=kwargs, **ctx.key_parts)
    path = ctx.state_dir / "transfer_source.pt"
    pl.seed_everything(spec.seed, verbose=False)  # the source's initial weights too: not what ran before
    module = ClassifierModule(create_model(name, num_classes=num_classes, **kwargs),
                              ClassifierSettings(model=name, epochs=spec.epochs, lr=spec.lr))
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True) if ctx.cfg.eval.resume else {}
    except (OSError, RuntimeError, pickle.UnpicklingError):  # missing or damaged: train again
        saved = {}
    if isinstance(saved, dict) and saved.get("key") == key:
        module.model.load_state_dict(saved["state_dict"])
    else:
        log.info("transfer: training a %s source model for %d epochs (seed %d)", name, spec.epochs, spec.seed)
        quiet = {"enable_progress_bar": False, "enable_model_summary": False}
        trainer = pl.Trainer(max_epochs=spec.epochs, logger=False, enable_checkpointing=False,
                             use_distributed_sampler=False, callbacks=[BatchesOnDevice()],
                             **{**trainer_kwargs(ctx.cfg), **quiet})
        trainer.fit(module, train_dataloaders=dm.train_dataloader())
        if trainer.is_global_zero:
            atomic_torch_save({"key": key, "state_dict": module.model.state_dict()}, path)
    return freeze(module.model.cpu()), key
