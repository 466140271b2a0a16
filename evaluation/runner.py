"""Evaluate a saved defense the way a reviewer would: every threat model, converged attacks, sanity checks.

``evaluate(cfg)`` loads ``runs/<name>/defense.pt`` (or the run's ``eval.defense`` file, e.g. a diffusion
purifier's ``defense_ssni_n.pt``) and the test split and

1. runs the clean images, every classifier-only attack and the transfer attacks on the first ``max_test``
   test images, and every attack through the defense and every mixed-batch attack (an attacked image among
   clean filler, at each fraction of ``eval.mixed_fractions``) on the first ``max_test_defense``, batch by
   batch at the defense's batch size, through a :class:`~lightning_modules.evaluator.DefenseEvaluator`
   (a sample is robust only if the defense is right in every one of ``eval.draws`` noise draws); each
   attack's per-batch results are saved in ``eval_state/<attack>.pt`` and reused by a later run when the
   attack, the defense file and the data are unchanged (an interrupted evaluation resumes);
2. runs the sanity phase (:mod:`evaluation.sanity`): gradients, randomness and EOT, white box vs
   classifier-only, an eps sweep, more steps / EOT samples / restarts / draws of the strongest attack on
   ``eval.sanity_samples`` images (folded into the worst case where they find more), and the FPR check
   (:func:`evaluation.analysis.fpr_check`);
3. reports per threat model the per-sample worst case over the whole-batch attacks, each mixed-batch
   attack's AE-part accuracy and the headline (the lowest), every accuracy with its 95% interval, DAD
   against the undefended classifier with a paired interval, and detection metrics per batch size
   (:mod:`evaluation.analysis`);
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

from callbacks import AttackStateWriter, BatchesOnDevice, DetectionHistogramLogger, ProgressLog, log_figures
from dad.attacks import AttackSpec
from dad.defense import DADDefense
from dad.defense_file import load_defense
from dad.io import atomic_torch_save, atomic_write_json, atomic_write_text, sha256_file
from dad.metrics import auroc, roc_curve
from dad.models import create_model, freeze, load_classifier_weights
from dad.stats import paired_difference_interval
from datamodules import DADDataModule
from datamodules.sampling import ShardedBatchSampler
from evaluation import plots
from evaluation.analysis import (
    detection_metrics, fpr_check, fraction, pop_samples, sample_detection, summary, worst_cases,
)
from evaluation.report import report_markdown, strict_json
from evaluation.sanity import check_more_draws, run_sanity
from pipeline.eval_settings import TransferSettings
from evaluation.state import AttackState, state_key
from lightning_modules.classifier import ClassifierModule, ClassifierSettings
from lightning_modules.evaluator import CLEAN, DefenseEvaluator
from pipeline.config import PipelineConfig
from pipeline.paths import STAGES, RunPaths
from pipeline.stages import load_datamodule
from pipeline.trainer import FP32, run_device, trainer_arguments

__all__ = ["evaluate", "mixed_name"]

log = logging.getLogger(__name__)

TRANSFER_PREFIX = "transfer_"
PROTOCOL = 2
"""Version of how attacks are seeded and evaluated: part of every state's key, bumped when it changes
(2: R draws per evaluation, whole-batch judged candidates)."""


def mixed_name(attack: str, fraction: float) -> str:
    """The name of attack ``attack`` run on mixed batches with a share ``fraction`` of AEs."""
    return f"mixed_{attack}_{fraction:g}"


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
    fpr_labels: Tensor
    logger: TensorBoardLogger
    key_parts: dict[str, Any]
    variant: str
    device: torch.device  # the run's device: the Trainers attack there, the analysis between them runs there

    def output(self, name: str) -> Path:
        """``<run>/<name>`` for ``defense.pt`` under its saved routing, else ``<run>/<name>_<variant>`` (all kept)."""
        return self.paths.root / (f"{name}_{self.variant}" if self.variant else name)

    @property
    def state_dir(self) -> Path:
        return self.output("eval_state")

    def state_path(self, name: str) -> Path:
        return self.state_dir / f"{re.sub(r'[^A-Za-z0-9_.=-]', '_', name)}.pt"


def _trainer_kwargs(cfg: PipelineConfig) -> dict[str, Any]:
    """The run's Trainer settings, without the batch limits of training, in float32 whatever precision the run
    trained in (attacks and judgements are reported in float32)."""
    return {**{k: v for k, v in trainer_arguments(cfg.trainer).items()
               if not k.startswith("limit_") and k not in ("logger", "callbacks")}, **FP32}


def _run_attacks(ctx: _Context, attacks: Mapping[str, AttackSpec], n: int,
                 sources: Mapping[str, tuple[nn.Module, str]] | None = None, with_clean: bool = False,
                 mixed: Mapping[str, tuple[AttackSpec, float]] | None = None,
                 callbacks: list[Callback] | None = None) -> DefenseEvaluator:
    """Run attacks (and mixed-batch attacks) over the first ``n`` test images, resuming saved states."""
    sources, mixed = dict(sources or {}), dict(mixed or {})
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
                        **ctx.key_parts)
        states[name] = AttackState.resume(ctx.state_path(name), key) if ctx.cfg.eval.resume else AttackState(key)
        if states[name].batches:
            log.info("%s: %d batches reused from %s", name, len(states[name].batches), ctx.state_path(name))
    module = DefenseEvaluator(ctx.defense, attacks, states=states, with_clean=with_clean,
                              sources={name: model for name, (model, _) in sources.items()}, batch_size=ctx.batch_size,
                              draws=ctx.cfg.eval.draws, mixed=mixed, filler=(ctx.fpr_pool, ctx.fpr_labels))
    writer = AttackStateWriter({name: ctx.state_path(name) for name in names})
    progress = ProgressLog("attacks" if with_clean else "attacks through the defense" if mixed else "sanity re-runs")
    trainer = pl.Trainer(
        default_root_dir=str(ctx.paths.root), logger=ctx.logger, callbacks=[writer, progress, *(callbacks or [])],
        inference_mode=False, use_distributed_sampler=False, enable_checkpointing=False, **_trainer_kwargs(ctx.cfg),
    )
    # whole batches per rank, no padding: every test sample is counted exactly once under DDP
    data = TensorDataset(ctx.x[:n], ctx.y[:n], torch.arange(n))
    loader = DataLoader(data, batch_sampler=ShardedBatchSampler(n, ctx.batch_size))
    log.info("evaluating %s on %d test images", ", ".join(names), n)
    trainer.test(module, dataloaders=loader, verbose=False)
    ctx.defense.to(ctx.device)  # the teardown moved it back to the CPU: the analysis runs on the run's device
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
                             use_distributed_sampler=False, callbacks=[BatchesOnDevice()],
                             **{**_trainer_kwargs(ctx.cfg), **quiet})
        trainer.fit(module, train_dataloaders=dm.train_dataloader())
        if trainer.is_global_zero:
            atomic_torch_save({"key": key, "state_dict": module.model.state_dict()}, path)
    return freeze(module.model.cpu()), key


def _detection(ctx: _Context, states: Mapping[str, AttackState], threats: Mapping[str, str],
               results: Mapping[str, Any]) -> tuple[dict[str, Any], dict[int, Tensor], dict[str, dict[int, Tensor]]]:
    """Detection metrics per batch size; also returns the clean and adversarial batch scores drawn."""
    detector = ctx.defense.detector
    b, n_random = ctx.batch_size, ctx.cfg.eval.random_batches
    clean = states[CLEAN].gather("x_adv").to(ctx.device)
    sizes = sorted({s for s in [*ctx.cfg.eval.detection_batch_sizes, b] if 2 <= s <= len(clean)})
    pools = {name: states[name].gather("x_adv").to(ctx.device) for name, t in threats.items() if t != "defense"}
    attacked = {name: states[name].per_batch("score") for name, t in threats.items() if t == "defense"}
    by_size, clean_scores, attack_scores = detection_metrics(
        ctx.defense, clean, ctx.y[: len(clean)].to(ctx.device), ctx.fpr_pool.to(ctx.device), pools, attacked, sizes,
        b, n_random)
    per_sample = (sample_detection(ctx.defense, ctx.fpr_pool.to(ctx.device), pools)
                  if ctx.defense.sample_detector is not None and ctx.defense.sample_detector.calibrated else None)
    threshold = detector.threshold_for(b).item()
    detection = {
        "threshold": threshold,
        "target_fpr": ctx.defense.target_fpr,
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
        "per_sample": per_sample,
    }
    return detection, clean_scores, attack_scores


def _plots(ctx: _Context, states: Mapping[str, AttackState], report: dict[str, Any], clean_scores: dict[int, Tensor],
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
    mixed = report["mixed"]
    if mixed:
        by_attack: dict[str, dict[float, dict[str, Any]]] = {}
        for entry in mixed.values():
            by_attack.setdefault(entry["attack"], {})[entry["fraction"]] = entry
        fractions = sorted({p for rows in by_attack.values() for p in rows})
        rows = {f"{attack}: {key}": [by_attack[attack].get(p, {}).get(key) for p in fractions]
                for attack in by_attack for key in ("detection_rate", "dad")}
        figures["mixed_batches"] = plots.mixed_batches_figure(fractions, rows, ", ".join(by_attack))
    shown = (sweep.get("attack") if sweep else None) or next(iter(at_b), None)
    if shown is not None:
        adv = states[shown].batches[0]["x_adv"][:8]
        with torch.no_grad():
            denoised = ctx.defense.purify(adv.to(ctx.device)).cpu()
        figures["images"] = plots.image_grid_figure(
            {"clean": ctx.x[: len(adv)], "adversarial": adv, "denoised": denoised},
            f"{shown}: clean / AE / denoised AE")
    written = {}
    for tag, fig in figures.items():
        path = ctx.output("plots") / f"{tag}.png"
        plots.save_figure(fig, path)
        written[tag] = str(path.relative_to(ctx.paths.root))
    log_figures(ctx.logger, {f"eval/{tag}": fig for tag, fig in figures.items()})
    return written


def _accuracies(states: Mapping[str, AttackState], results: Mapping[str, Any], name: str) -> dict[str, Any]:
    """DAD, the undefended classifier and the denoiser path under one attack, with intervals and the paired
    difference DAD - undefended."""
    dad, undefended = states[name].gather("dad"), states[name].gather("undefended")
    entry = {key: results[name][key] for key in ("undefended", "dad", "dad_mean", "denoised")}
    return {**entry, "n": dad.numel(), "dad_ci95": summary(dad)["ci95"],
            "undefended_ci95": summary(undefended)["ci95"],
            "dad_minus_undefended": list(paired_difference_interval(dad, undefended))}


def _mixed_entry(state: AttackState, result: Mapping[str, Any], attack: str, share: float,
                 threat: str) -> dict[str, Any]:
    """A mixed-batch attack: AE-part accuracy (every draw right) with its interval, detection and filler accuracy."""
    part = summary(state.gather("dad"))
    return {"attack": attack, "fraction": share, "threat": threat, "dad": part["dad"], "dad_ci95": part["ci95"],
            "n": part["n"], "dad_mean": result["dad_mean"], "detection_rate": result["detection_rate"],
            "filler_acc": float(state.per_batch("filler_acc").mean())}


def evaluate(cfg: PipelineConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``runs/<name>/defense.pt`` under ``cfg.eval`` and write ``report.json`` / ``report.md`` / plots."""
    start = time.perf_counter()
    paths = RunPaths(Path(run_dir) if run_dir is not None else cfg.run.dir)
    defense_file = paths.defense if cfg.eval.defense is None else paths.root / cfg.eval.defense
    defense = load_defense(defense_file, checkpoint=cfg.eval.purifier_checkpointing)
    saved_routing = defense.routing
    if cfg.eval.routing is not None:
        defense.routing = cfg.eval.routing
    variant = "_".join([defense_file.stem.removeprefix("defense_")] * (defense_file != paths.defense)
                       + [defense.routing] * (defense.routing != saved_routing))
    dm = load_datamodule(cfg, paths)
    fpr_pool, fpr_labels = dm.split_tensors("test")  # every clean test image: the FPR pool and the mixed filler
    ev = cfg.eval
    n = len(fpr_labels) if ev.max_test is None else min(ev.max_test, len(fpr_labels))
    n_defense = n if ev.max_test_defense is None else min(ev.max_test_defense, n)
    b = cfg.defense.batch_size
    specs = {name: replace(spec, batch_size=b) for name, spec in ev.attacks.items()}
    logger = TensorBoardLogger(save_dir=str(paths.root), name="logs", version="_".join(["eval", variant]).strip("_"),
                               default_hp_metric=False)
    ctx = _Context(cfg, paths, defense, fpr_pool[:n], fpr_labels[:n], b, fpr_pool, fpr_labels, logger,
                   {"defense": sha256_file(defense_file), "split": dm.splits.digest(), "batch_size": b,
                    "routing": defense.routing, "protocol": PROTOCOL}, variant, run_device(cfg.trainer))
    defense.to(ctx.device)
    threats = {name: s.threat for name, s in specs.items()}

    sources: dict[str, tuple[nn.Module, str]] = {}
    transfer_info = None
    if ev.transfer.attacks:
        source, source_key = _transfer_source(ctx, dm, ev.transfer)
        with torch.no_grad():
            source_acc = fraction(source.to(ctx.device)(ctx.x.to(ctx.device)).argmax(1) == ctx.y.to(ctx.device))
        for name in ev.transfer.attacks:
            specs[TRANSFER_PREFIX + name] = specs[name]
            threats[TRANSFER_PREFIX + name] = "transfer"
            sources[TRANSFER_PREFIX + name] = (source, source_key)
        transfer_info = {"source": {**asdict(ev.transfer), "model": ev.transfer.model or
                                    defense.specs["classifier"]["name"], "clean_acc": source_acc},
                         "attacks": [TRANSFER_PREFIX + a for a in ev.transfer.attacks]}
    mixed_bases = {mixed_name(a, p): (a, p) for a in ev.mixed_attacks for p in ev.mixed_fractions}
    mixed = {name: (specs[a], p) for name, (a, p) in mixed_bases.items()}

    whole = {name: s for name, s in specs.items() if threats[name] != "defense"}
    through = {name: s for name, s in specs.items() if threats[name] == "defense"}
    first = _run_attacks(ctx, whole, n, sources=sources, with_clean=True, callbacks=[DetectionHistogramLogger()])
    second = _run_attacks(ctx, through, n_defense, mixed=mixed)
    attacks_seconds = time.perf_counter() - start
    states = {**first.states, **second.states}
    results = {**first.results(), **second.results()}
    dad = {name: states[name].gather("dad") for name in [*specs, *mixed]}
    undefended = {name: states[name].gather("undefended") for name in specs}
    with torch.no_grad():
        num_classes = int(defense.classifier(ctx.x[:2].to(ctx.device)).shape[1])

    detection, clean_scores, attack_scores = _detection(ctx, states, threats, results)
    sanity_start = time.perf_counter()

    def run(attacks: Mapping[str, AttackSpec], count: int) -> dict[str, dict[str, Tensor]]:
        module = _run_attacks(ctx, attacks, count)
        return {key: {name: module.states[name].gather(key) for name in attacks} for key in ("dad", "undefended")}

    probe_name = next(iter(through), CLEAN)
    probes = (ctx.x[:b].to(ctx.device), states[probe_name].batches[0]["x_adv"].to(ctx.device),
              ctx.y[:b].to(ctx.device))
    checks, sweep, folded = run_sanity(defense, probes, specs, threats, dad, num_classes, run, ev.sanity_attack,
                                       ev.sanity_samples, b, ev.sweep_factors, ev.sanity_z)
    if sweep:  # the strongest attack's AEs on the re-run subset, judged with twice the draws
        checks["more_draws"] = check_more_draws(defense, sweep["attack"], specs[sweep["attack"]],
                                                states[sweep["attack"]].batches, fpr_labels, sweep["n"], ev.draws,
                                                ev.sanity_z)
    calibration_pool = len(getattr(dm.splits, dm.splits.calibration_split))
    purified = defense.purified_share(fpr_pool.to(ctx.device), b, ev.random_batches, torch.Generator().manual_seed(7))
    fpr_detail = None  # a fixed route (never / always) has no false positives to check
    if defense.router.detecting:
        checks["fpr"], fpr_detail = fpr_check(purified, detection["target_fpr"], len(fpr_labels), calibration_pool,
                                              b, defense.router, ev.sanity_z)
    sanity_seconds = time.perf_counter() - sanity_start
    report: dict[str, Any] = {
        "clean_acc": {**_accuracies(states, results, CLEAN), "detection_rate": results[CLEAN]["detection_rate"]},
        "robust_acc": {name: _accuracies(states, results, name) for name in specs},
        "mixed": {name: _mixed_entry(states[name], results[name], attack, p, specs[attack].threat)
                  for name, (attack, p) in mixed_bases.items()},
        "worst_case": worst_cases(specs, threats, dad, undefended, mixed_bases, folded),
        "detection": {**detection, "clean_purified": purified, "fpr_check": fpr_detail},
        "transfer": transfer_info,
        "sanity": {key: c.as_dict() for key, c in checks.items()},
        "sweep": sweep,
        "attacks": {name: {**s.as_dict(), "threat": threats[name]} for name, s in specs.items()},
        "routing": defense.routing,
        "defense_file": defense_file.name,
        "purifier": _purifier_summary(defense),
        "draws": ev.draws,
        "num_test": n,
        "num_test_defense": n_defense,
        "num_classes": num_classes,
        "variant": variant,
    }
    if ev.plots and pl.utilities.rank_zero.rank_zero_only.rank == 0:
        report["plots"] = _plots(ctx, states, report, clean_scores, attack_scores, num_classes)
    report["timings_s"] = {**_stage_timings(paths), "eval": time.perf_counter() - start,
                           "eval_attacks": attacks_seconds, "eval_sanity": sanity_seconds,
                           "attacks": {name: states[name].per_batch("seconds").sum().item()
                                       for name in [*specs, *mixed]}}
    report["worst_case"], samples = pop_samples(report["worst_case"])
    samples["clean_acc/samples"] = states[CLEAN].gather("dad").bool().cpu()
    report = strict_json(report)
    name = ctx.output("report").name
    if pl.utilities.rank_zero.rank_zero_only.rank == 0:
        atomic_torch_save(samples, paths.root / f"{name}_samples.pt")  # per-sample correctness, for paired intervals
        atomic_write_json(report, paths.root / f"{name}.json")
        atomic_write_text(report_markdown(report), paths.root / f"{name}.md")
    return report


def _purifier_summary(defense: DADDefense) -> dict[str, Any] | None:
    """The purifier's settings without its networks' architecture (None for DAD's own noise and denoiser)."""
    spec = defense.purifier.spec()
    if spec["kind"] == "denoiser":
        return None
    return {k: v for k, v in spec.items() if k not in ("score_net", "schedule", "denoiser")}


def _stage_timings(paths: RunPaths) -> dict[str, float]:
    timings = {}
    for stage in STAGES:
        done = paths.done(stage)
        if done.is_file():
            timings[stage] = json.loads(done.read_text()).get("seconds")
    return timings
