"""Evaluate a saved defense the way a reviewer would: every threat model, detection metrics, sanity checks.

``evaluate(cfg)`` loads ``runs/<name>/defense.pt`` and the test split and

1. runs every attack of ``cfg.eval.attacks`` (classifier-only, full white box through the defense) and
   the transfer attacks, batch by batch at the defense's batch size, through a
   :class:`~lightning_modules.evaluator.DefenseEvaluator`; each attack's per-batch results are saved in
   ``eval_state/<attack>.pt`` and reused by a later run when the attack, the defense file and the data are
   unchanged (an interrupted evaluation resumes);
2. reports the per-sample worst case over the full-white-box attacks of each threat model next to the
   classifier-only one, detection metrics (AUROC, TPR, FPR) per batch size, and batches mixing clean
   images with a fraction of AEs (:mod:`evaluation.analysis`);
3. re-runs the strongest full-white-box attack of the primary threat model (that of the first
   full-white-box attack configured) on a few batches for the sanity checks of
   :mod:`dad.sanity` (eps sweep, more steps / EOT samples / restarts) and checks gradients, randomness
   and EOT, and white box vs classifier-only;
4. writes ``report.json``, ``report.md`` (:mod:`evaluation.report`) and PNG plots (``plots/``), also logged
   to TensorBoard (``logs/eval``).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import AttackStateWriter, DetectionHistogramLogger, ProgressLog, log_figures
from dad.attacks import AttackSpec
from dad.attacks._utils import margin
from dad.defense import DADDefense, load_defense
from dad.io import atomic_torch_save, atomic_write_json, atomic_write_text, sha256_file
from dad.metrics import roc_curve, auroc, worst_case
from dad.models import create_model, freeze, load_classifier_weights
from dad.sanity import (
    CheckResult, attack_checks, attack_variants, check_at_least_as_strong, check_gradients, check_randomness,
    check_unchanged, is_randomized,
)
from datamodules import DADDataModule
from datamodules.sampling import ShardedBatchSampler
from evaluation import plots
from evaluation.analysis import detection_metrics, fraction, mixed_batches, threat_groups, threat_label, worst_cases
from evaluation.report import report_markdown, strict_json
from evaluation.settings import TransferSettings
from evaluation.state import AttackState, state_key
from lightning_modules.classifier import ClassifierModule, ClassifierSettings
from lightning_modules.evaluator import CLEAN, DefenseEvaluator
from pipeline.config import PipelineConfig
from pipeline.paths import STAGES, RunPaths
from pipeline.stages import load_datamodule
from pipeline.trainer import trainer_arguments

__all__ = ["evaluate"]

log = logging.getLogger(__name__)

TRANSFER_PREFIX = "transfer_"
PROTOCOL = 1
"""Version of how attacks are seeded and evaluated: part of every state's key, bumped when it changes."""


@dataclass
class _Context:
    """What every phase of one evaluation shares."""

    cfg: PipelineConfig
    paths: RunPaths
    defense: DADDefense
    x: Tensor
    y: Tensor
    batch_size: int
    fpr_pool: Tensor
    logger: TensorBoardLogger
    key_parts: dict[str, Any]

    @property
    def device(self) -> torch.device:
        """Where the defense is now (the Trainer may have moved it to an accelerator)."""
        return next(self.defense.parameters()).device

    @property
    def state_dir(self) -> Path:
        return self.paths.root / "eval_state"

    def state_path(self, name: str) -> Path:
        return self.state_dir / f"{re.sub(r'[^A-Za-z0-9_.=-]', '_', name)}.pt"


def _trainer_kwargs(cfg: PipelineConfig) -> dict[str, Any]:
    """The run's Trainer settings, without the batch limits of training."""
    return {k: v for k, v in trainer_arguments(cfg.trainer).items()
            if not k.startswith("limit_") and k not in ("logger", "callbacks")}


def _run_attacks(ctx: _Context, attacks: Mapping[str, AttackSpec], num_samples: int | None = None,
                 sources: Mapping[str, tuple[nn.Module, str]] | None = None, with_clean: bool = False,
                 callbacks: list[Callback] | None = None) -> DefenseEvaluator:
    """Run attacks over the first ``num_samples`` test images (all by default), resuming saved states."""
    sources = dict(sources or {})
    n = len(ctx.y) if num_samples is None else num_samples
    names = [CLEAN] * with_clean + list(attacks)
    states = {}
    for name in names:
        config = "clean" if name == CLEAN else attacks[name].as_dict()
        key = state_key(attack=config, source=sources[name][1] if name in sources else None, **ctx.key_parts)
        states[name] = AttackState.resume(ctx.state_path(name), key) if ctx.cfg.eval.resume else AttackState(key)
        if states[name].batches:
            log.info("%s: %d batches reused from %s", name, len(states[name].batches), ctx.state_path(name))
    module = DefenseEvaluator(ctx.defense, attacks, states=states, with_clean=with_clean,
                              sources={name: model for name, (model, _) in sources.items()}, batch_size=ctx.batch_size)
    writer = AttackStateWriter({name: ctx.state_path(name) for name in names})
    progress = ProgressLog("attacks" if with_clean else "sanity re-runs")
    trainer = pl.Trainer(
        default_root_dir=str(ctx.paths.root), logger=ctx.logger, callbacks=[writer, progress, *(callbacks or [])],
        inference_mode=False, use_distributed_sampler=False, enable_checkpointing=False, **_trainer_kwargs(ctx.cfg),
    )
    index = torch.arange(n)
    # whole batches per rank, no padding: every test sample is counted exactly once under DDP
    data = TensorDataset(ctx.x[:n], ctx.y[:n], index)
    loader = DataLoader(data, batch_sampler=ShardedBatchSampler(n, ctx.batch_size))
    log.info("evaluating %s on %d test images", ", ".join(names), n)
    trainer.test(module, dataloaders=loader, verbose=False)
    return module


def _transfer_source(ctx: _Context, dm: DADDataModule, spec: TransferSettings) -> tuple[nn.Module, str]:
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
    key = state_key(transfer=asdict(spec), model=name, kwargs=kwargs, **ctx.key_parts)
    path = ctx.state_dir / "transfer_source.pt"
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
        pl.seed_everything(spec.seed, verbose=False)
        quiet = {"enable_progress_bar": False, "enable_model_summary": False}
        trainer = pl.Trainer(max_epochs=spec.epochs, logger=False, enable_checkpointing=False,
                             use_distributed_sampler=False, **{**_trainer_kwargs(ctx.cfg), **quiet})
        trainer.fit(module, train_dataloaders=dm.train_dataloader())
        if trainer.is_global_zero:
            atomic_torch_save({"key": key, "state_dict": module.model.state_dict()}, path)
    return freeze(module.model.cpu()), key


def _detection(ctx: _Context, module: DefenseEvaluator, threats: Mapping[str, str], results: Mapping[str, Any]
               ) -> tuple[dict[str, Any], dict[int, Tensor], dict[str, dict[int, Tensor]]]:
    """Detection metrics per batch size; also returns the clean and adversarial batch scores drawn."""
    detector = ctx.defense.detector
    b, n_random = ctx.batch_size, ctx.cfg.eval.random_batches
    clean = module.states[CLEAN].gather("x_adv").to(ctx.device)
    sizes = sorted({s for s in [*ctx.cfg.eval.detection_batch_sizes, b] if 2 <= s <= len(clean)})
    pools = {name: module.states[name].gather("x_adv").to(ctx.device) for name, t in threats.items()
             if t != "defense"}
    attacked = {name: module.scores[name] for name, t in threats.items() if t == "defense"}
    by_size, clean_scores, attack_scores = detection_metrics(
        ctx.defense, clean, ctx.y[: len(clean)].to(ctx.device), ctx.fpr_pool.to(ctx.device), pools, attacked, sizes,
        b, n_random)
    threshold = detector.threshold_for(b).item()
    detection = {
        "threshold": threshold,
        "target_fpr": detector.target_fpr,
        "batch_size": b,
        "fpr_clean": by_size[str(b)]["fpr_clean"],
        "fpr_clean_sequential": results[CLEAN]["detection_rate"],
        "random_batches": n_random,
        "clean_pool": len(ctx.fpr_pool),
        "tpr": {name: results[name]["detection_rate"] for name in threats},
        "tpr_random_batches": {name: by_size[str(b)]["tpr"][name] for name in pools},
        "auroc": {name: {str(s): by_size[str(s)]["auroc"][name] for s in sizes if name in by_size[str(s)]["auroc"]}
                  for name in threats},
        "by_batch_size": by_size,
    }
    return detection, clean_scores, attack_scores


def _mixed(ctx: _Context, module: DefenseEvaluator, attack: str) -> dict[str, Any]:
    clean, adv = module.states[CLEAN].gather("x_adv"), module.states[attack].gather("x_adv")
    y = ctx.y[: len(clean)].to(ctx.device)
    rows = mixed_batches(ctx.defense, clean.to(ctx.device), adv.to(ctx.device), y, ctx.cfg.eval.mixed_fractions,
                         ctx.batch_size, ctx.cfg.eval.mixed_batches, ctx.cfg.run.seed)
    return {"attack": attack, **rows}


def _sanity(ctx: _Context, module: DefenseEvaluator, presets: Mapping[str, AttackSpec], threats: Mapping[str, str],
            results: Mapping[str, Any], dad: Mapping[str, Tensor], probe_attack: str | None,
            num_classes: int) -> tuple[dict[str, CheckResult], dict[str, Any]]:
    """The sanity checks; also returns the eps sweep (for the report and the plot)."""
    z, b = ctx.cfg.eval.sanity_z, ctx.batch_size
    checks: dict[str, CheckResult] = {}
    white = [n for n in presets if threats[n] == "defense"]
    clean_batch, labels = ctx.x[:b].to(ctx.device), ctx.y[:b].to(ctx.device)
    probe = module.states[probe_attack or (white[0] if white else CLEAN)].batches[0]["x_adv"].to(ctx.device)
    if probe.numel() == 0:
        probe = clean_batch

    def margin_loss(x: Tensor) -> Tensor:
        return margin(ctx.defense(x), labels[: len(x)])

    checks["gradients"] = check_gradients(margin_loss, [clean_batch, probe])
    needs_eot = {n: presets[n].eot_samples for n in white if presets[n].needs_eot}
    checks["randomness_eot"] = check_randomness(ctx.defense, [clean_batch, probe], needs_eot)
    randomized = is_randomized(ctx.defense, [clean_batch, probe])

    groups = threat_groups(presets, threats)
    compared = [check_at_least_as_strong(f"{label}: worst case white box vs classifier-only (DAD)",
                                         worst_case([dad[n] for n in g["defense"]]),
                                         worst_case([dad[n] for n in g["classifier"]]), z)
                for label, g in groups.items() if g["defense"] and g["classifier"]]
    checks["white_box_stronger"] = (
        CheckResult(all(c.passed for c in compared), "; ".join(c.detail for c in compared)) if compared
        else CheckResult(False, "not run: no threat model has both a full-white-box and a classifier-only attack"))
    if not white:
        checks["attack_strength"] = CheckResult(False, "not run: no full-white-box attack configured")
        return checks, {}

    primary = [n for n in white if threat_label(presets[n]) == threat_label(presets[white[0]])]
    name = ctx.cfg.eval.sanity_attack or min(primary, key=lambda n: results[n]["dad"])
    base = presets[name]
    n_sub = min(ctx.cfg.eval.sanity_batches * b, len(ctx.y))
    factors = ctx.cfg.eval.sweep_factors
    variants = {run: f"sanity__{name}__eps{run[0]:g}_steps{run[1]}_eot{run[2]}_seed{run[3]}"
                for run in attack_variants(factors, randomized and base.needs_eot)[1:]}
    classifier_attack = next((n for n, p in presets.items() if threats[n] == "classifier" and p.name == "pgd"
                              and p.norm == base.norm), None)
    sweep_base = presets[classifier_attack] if classifier_attack else AttackSpec(
        name="pgd", threat="classifier", norm=base.norm, eps=base.eps, step_size=base.step_size, steps=base.steps,
        seed=base.seed)
    sweep_names = {f: f"sweep__classifier__eps{f:g}" for f in sorted({*factors, 1.0})}
    runs = {v: base.scaled(*run) for run, v in variants.items()}
    runs |= {v: sweep_base.scaled(f * base.eps / sweep_base.eps) for f, v in sweep_names.items()}
    eot_name = None
    if randomized and not base.needs_eot:  # the EOT check then runs on the strongest attack that needs EOT
        eot_name = min((n for n in white if presets[n].needs_eot), key=lambda n: results[n]["dad"], default=None)
    if eot_name is not None:
        runs[f"sanity__{eot_name}__eot_x2"] = presets[eot_name].scaled(eot_factor=2)
    extra = _run_attacks(ctx, runs, num_samples=n_sub)

    def robust(eps_factor: float, steps_factor: int, eot_factor: int, seed_offset: int) -> Tensor:
        run = (eps_factor, steps_factor, eot_factor, seed_offset)
        if run == (1.0, 1, 1, 0):
            return dad[name][:n_sub]
        return extra.states[variants[run]].gather("dad")

    strength, sweep = attack_checks(robust, num_classes, base.eps, factors, randomized and base.needs_eot, z)
    checks |= {key: CheckResult(c.passed, f"{name}: {c.detail}") for key, c in strength.items()}
    if eot_name is not None:
        more_eot = check_unchanged("2x EOT samples", dad[eot_name][:n_sub],
                                   extra.states[f"sanity__{eot_name}__eot_x2"].gather("dad"), z)
        checks["more_eot"] = CheckResult(more_eot.passed, f"{eot_name} (the strongest attack needing EOT; {name} "
                                         f"does not): {more_eot.detail}")
    eps = sorted(sweep)
    sweep_report = {
        "attack": name, "classifier_attack": classifier_attack or "pgd (derived from the white-box attack)",
        "norm": base.norm, "n": n_sub, "eps": [f * base.eps for f in eps],
        "dad_white_box": [fraction(sweep[f]) for f in eps],
        "dad_classifier_only": [fraction(extra.states[sweep_names[f]].gather("dad")) for f in eps],
        "undefended": [fraction(extra.states[sweep_names[f]].gather("undefended")) for f in eps],
    }
    return checks, sweep_report


def _plots(ctx: _Context, module: DefenseEvaluator, report: dict[str, Any], clean_scores: dict[int, Tensor],
           attack_scores: dict[str, dict[int, Tensor]], num_classes: int) -> dict[str, str]:
    """Write the PNG plots into ``<run>/plots`` and log the same figures to TensorBoard."""
    b = ctx.batch_size
    figures = {}
    at_b = {name: scores[b] for name, scores in attack_scores.items() if b in scores}
    figures["roc"] = plots.roc_figure({name: (*roc_curve(clean_scores[b], s), auroc(clean_scores[b], s))
                                       for name, s in at_b.items()}, b)
    figures["mmd_histogram"] = plots.score_histogram_figure(clean_scores[b], at_b, report["detection"]["threshold"], b)
    sweep = report.get("sweep") or {}
    if sweep:
        figures["accuracy_vs_eps"] = plots.accuracy_vs_eps_figure(sweep["eps"], {
            "undefended (classifier-only PGD)": sweep["undefended"],
            "DAD, classifier-only PGD": sweep["dad_classifier_only"],
            f"DAD, {sweep['attack']} (full white box)": sweep["dad_white_box"],
        }, 1.0 / num_classes, sweep["norm"])
    mixed = report.get("mixed") or {}
    if mixed:
        fractions = [float(p) for p in mixed["fractions"]]
        rows = {key: [mixed["fractions"][p][key] for p in mixed["fractions"]]
                for key in ("detection_rate", "acc_clean_part", "acc_adv_part")}
        figures["mixed_batches"] = plots.mixed_batches_figure(fractions, rows, mixed["attack"])
    shown = (sweep.get("attack") if sweep else None) or next(iter(at_b), None)
    if shown is not None:
        adv = module.states[shown].batches[0]["x_adv"][:8]
        with torch.no_grad():
            denoised = ctx.defense.purify(adv.to(ctx.device)).cpu()
        figures["images"] = plots.image_grid_figure(
            {"clean": ctx.x[: len(adv)], "adversarial": adv, "denoised": denoised},
            f"{shown}: clean / AE / denoised AE")
    written = {}
    for tag, fig in figures.items():
        path = ctx.paths.root / "plots" / f"{tag}.png"
        plots.save_figure(fig, path)
        written[tag] = str(path.relative_to(ctx.paths.root))
    log_figures(ctx.logger, {f"eval/{tag}": fig for tag, fig in figures.items()})
    return written


def evaluate(cfg: PipelineConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``runs/<name>/defense.pt`` under ``cfg.eval`` and write ``report.json`` / ``report.md`` / plots."""
    start = time.perf_counter()
    paths = RunPaths(Path(run_dir) if run_dir is not None else cfg.run.dir)
    defense = load_defense(paths.defense)
    dm = load_datamodule(cfg, paths)
    x, y = dm.split_tensors("test")
    fpr_pool = x  # every clean test image; the attacks below may see only the first `max_test`
    if cfg.eval.max_test is not None:
        x, y = x[: cfg.eval.max_test], y[: cfg.eval.max_test]
    b = cfg.defense.batch_size
    presets = {name: replace(spec, batch_size=b) for name, spec in cfg.eval.attacks.items()}
    logger = TensorBoardLogger(save_dir=str(paths.root), name="logs", version="eval", default_hp_metric=False)
    ctx = _Context(cfg, paths, defense, x, y, b, fpr_pool, logger,
                   {"defense": sha256_file(paths.defense), "split": dm.splits.digest(), "num_test": len(y),
                    "batch_size": b, "protocol": PROTOCOL})
    threats = {name: p.threat for name, p in presets.items()}

    transfer_spec = cfg.eval.transfer
    sources: dict[str, tuple[nn.Module, str]] = {}
    transfer_info = None
    if transfer_spec.attacks:
        source, source_key = _transfer_source(ctx, dm, transfer_spec)
        with torch.no_grad():
            source_acc = fraction(source(x).argmax(1) == y)
        for name in transfer_spec.attacks:
            presets[TRANSFER_PREFIX + name] = presets[name]
            threats[TRANSFER_PREFIX + name] = "transfer"
            sources[TRANSFER_PREFIX + name] = (source, source_key)
        transfer_info = {"source": {**asdict(transfer_spec), "model": transfer_spec.model or
                                    defense.specs["classifier"]["name"], "clean_acc": source_acc},
                         "attacks": [TRANSFER_PREFIX + n for n in transfer_spec.attacks]}

    module = _run_attacks(ctx, presets, sources=sources, with_clean=True, callbacks=[DetectionHistogramLogger()])
    attacks_seconds = time.perf_counter() - start
    results = module.results()
    dad = {name: module.states[name].gather("dad") for name in presets}
    undefended = {name: module.states[name].gather("undefended") for name in presets}
    classifier_attacks = [n for n, t in threats.items() if t == "classifier"]
    mixed_attack = cfg.eval.mixed_attack or (classifier_attacks[0] if classifier_attacks else None)
    with torch.no_grad():
        num_classes = int(defense.classifier(x[:2].to(ctx.device)).shape[1])

    detection, clean_scores, attack_scores = _detection(ctx, module, threats, results)
    sanity_start = time.perf_counter()
    checks, sweep = _sanity(ctx, module, presets, threats, results, dad, mixed_attack, num_classes)
    sanity_seconds = time.perf_counter() - sanity_start
    report: dict[str, Any] = {
        "clean_acc": {key: results[CLEAN][key] for key in ("undefended", "dad", "denoised")},
        "robust_acc": {name: {key: results[name][key] for key in ("undefended", "dad", "denoised")}
                       for name in presets},
        "worst_case": worst_cases(presets, threats, dad, undefended),
        "detection": detection,
        "mixed": _mixed(ctx, module, mixed_attack) if mixed_attack else None,
        "transfer": transfer_info,
        "sanity": {key: c.as_dict() for key, c in checks.items()},
        "sweep": sweep,
        "attacks": {name: {**p.as_dict(), "threat": threats[name]} for name, p in presets.items()},
        "num_test": len(y),
        "num_classes": num_classes,
    }
    if cfg.eval.plots and pl.utilities.rank_zero.rank_zero_only.rank == 0:
        report["plots"] = _plots(ctx, module, report, clean_scores, attack_scores, num_classes)
    report["timings_s"] = {**_stage_timings(paths), "eval": time.perf_counter() - start,
                           "eval_attacks": attacks_seconds, "eval_sanity": sanity_seconds,
                           "attacks": {name: module.states[name].per_batch("seconds").sum().item() for name in presets}}
    report = strict_json(report)
    if pl.utilities.rank_zero.rank_zero_only.rank == 0:
        atomic_write_json(report, paths.root / "report.json")
        atomic_write_text(report_markdown(report), paths.root / "report.md")
    return report


def _stage_timings(paths: RunPaths) -> dict[str, float]:
    timings = {}
    for stage in STAGES:
        done = paths.done(stage)
        if done.is_file():
            timings[stage] = json.loads(done.read_text()).get("seconds")
    return timings
