"""Evaluate a saved defense the way a reviewer would: every threat model, detection metrics, sanity checks.

``evaluate(cfg)`` loads ``runs/<name>/defense.pt`` and the test split and

1. runs every attack of ``cfg.eval.attacks`` (classifier-only, full white box through the defense) and
   the transfer attacks, batch by batch at the defense's batch size, through :class:`DADModule`; each
   attack's per-batch results are saved in ``eval_state/<attack>.pt`` and reused by a later run when the
   attack, the defense file and the data are unchanged (an interrupted evaluation resumes);
2. reports the per-sample worst case over the full-white-box attacks of each threat model next to the
   classifier-only one, detection metrics (AUROC, TPR, FPR) per batch size, and batches mixing clean
   images with a fraction of AEs;
3. re-runs the strongest full-white-box attack of the primary threat model (that of the first
   full-white-box attack configured) on a few batches for the sanity checks of
   :mod:`dad.sanity` (eps sweep, more steps / EOT samples / restarts) and checks gradients, randomness
   and EOT, and white box vs classifier-only;
4. writes ``report.json``, ``report.md`` and PNG plots (``plots/``), also logged to TensorBoard
   (``logs/eval``).
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.tensorboard import DetectionHistogramLogger, log_figures
from dad.attacks._utils import margin
from dad.attacks.presets import AttackPreset
from dad.attacks.state import AttackState, state_key
from dad.defense import DADDefense, load_defense
from dad.io import atomic_torch_save, atomic_write_json, atomic_write_text, sha256_file
from dad.metrics import auroc, batched_predictions, mixed_batch_rates, rate_above, roc_curve, worst_case
from dad.models import create_model, freeze, load_classifier_weights
from dad.sanity import (
    CheckResult, attack_checks, attack_variants, check_at_least_as_strong, check_gradients, check_randomness,
    check_unchanged, is_randomized,
)
from datamodules import DADDataModule
from datamodules.sampling import ShardedBatchSampler
from lightning_modules import plots
from lightning_modules.classifier import ClassifierModule
from lightning_modules.config import PipelineConfig, TransferConfig
from lightning_modules.dad import CLEAN, DADModule
from lightning_modules.pipeline import STAGES, RunPaths, _datamodule

__all__ = ["evaluate", "report_markdown", "AttackStateWriter", "ProgressLog"]

log = logging.getLogger(__name__)

TRANSFER_PREFIX = "transfer_"
PROTOCOL = 1
"""Version of how attacks are seeded and evaluated: part of every state's key, bumped when it changes."""


class AttackStateWriter(Callback):
    """Saves the attack states a :class:`DADModule` changed, atomically, every ``interval_s``, at the end and
    when the run is interrupted by an exception (Ctrl-C included).

    Args:
        paths: the file of each name's state.
        interval_s: minimum seconds between two writes during the run.
    """

    def __init__(self, paths: Mapping[str, Path], interval_s: float = 30.0) -> None:
        self.paths = dict(paths)
        self.interval_s = interval_s
        self._last = time.monotonic()

    def _flush(self, trainer: pl.Trainer, module: DADModule, merged: bool = False) -> None:
        # single process, or all ranks' records merged: rank 0 writes the state; otherwise every rank
        # writes its own share beside it (merged again when the evaluation resumes)
        for name in sorted(module.dirty):
            if merged or trainer.world_size == 1:
                if trainer.is_global_zero:
                    module.states[name].to_disk(self.paths[name])
                    for partial in _rank_files(self.paths[name]):
                        partial.unlink(missing_ok=True)
            else:
                module.states[name].to_disk(_rank_file(self.paths[name], trainer.global_rank))
        module.dirty.clear()
        self._last = time.monotonic()

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if time.monotonic() - self._last >= self.interval_s:
            self._flush(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, pl_module, merged=True)  # DADModule.on_test_epoch_end merged the ranks' records

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._flush(trainer, pl_module)  # an interrupted evaluation keeps every finished batch


def _rank_file(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _rank_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def _load_state(path: Path, key: str) -> AttackState:
    """The saved state of an attack, with the shares saved by the ranks of an interrupted DDP evaluation."""
    state = AttackState.from_disk(path, key)
    for partial in _rank_files(path):
        state.merge(AttackState.from_disk(partial, key))
    return state


class ProgressLog(Callback):
    """Logs each finished batch with the elapsed time and an estimate of the time left, when the progress bar
    is off (``trainer.enable_progress_bar: false``, or logs redirected to a file)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._start = time.monotonic()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.progress_bar_callback is not None or not trainer.is_global_zero:
            return
        done, total = batch_idx + 1, trainer.num_test_batches[0]
        elapsed = time.monotonic() - self._start
        log.info("%s: batch %d/%d (%.0f s, about %.0f s left)", self.label, done, total, elapsed,
                 elapsed / max(done, 1) * (total - done))


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
    return {k: v for k, v in cfg.trainer.kwargs().items() if not k.startswith("limit_")}


def _run_attacks(ctx: _Context, attacks: Mapping[str, AttackPreset], num_samples: int | None = None,
                 sources: Mapping[str, tuple[nn.Module, str]] | None = None, with_clean: bool = False,
                 callbacks: list[Callback] | None = None) -> DADModule:
    """Run attacks over the first ``num_samples`` test images (all by default), resuming saved states."""
    sources = dict(sources or {})
    n = len(ctx.y) if num_samples is None else num_samples
    names = [CLEAN] * with_clean + list(attacks)
    states = {}
    for name in names:
        config = "clean" if name == CLEAN else attacks[name].as_dict()
        key = state_key(attack=config, source=sources[name][1] if name in sources else None, **ctx.key_parts)
        states[name] = _load_state(ctx.state_path(name), key) if ctx.cfg.eval.resume else AttackState(key)
        if states[name].batches:
            log.info("%s: %d batches reused from %s", name, len(states[name].batches), ctx.state_path(name))
    module = DADModule(ctx.defense, attacks, states=states, with_clean=with_clean,
                       sources={name: model for name, (model, _) in sources.items()}, batch_size=ctx.batch_size)
    writer = AttackStateWriter({name: ctx.state_path(name) for name in names})
    progress = ProgressLog("attacks" if with_clean else "sanity re-runs")
    trainer = pl.Trainer(
        default_root_dir=str(ctx.paths.root), logger=ctx.logger, callbacks=[writer, progress, *(callbacks or [])],
        inference_mode=False, use_distributed_sampler=False, **_trainer_kwargs(ctx.cfg),
    )
    index = torch.arange(n)
    # whole batches per rank, no padding: every test sample is counted exactly once under DDP
    data = TensorDataset(ctx.x[:n], ctx.y[:n], index)
    loader = DataLoader(data, batch_sampler=ShardedBatchSampler(n, ctx.batch_size))
    log.info("evaluating %s on %d test images", ", ".join(names), n)
    trainer.test(module, dataloaders=loader, verbose=False)
    return module


def _transfer_source(ctx: _Context, dm: DADDataModule, spec: TransferConfig) -> tuple[nn.Module, str]:
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
    module = ClassifierModule(name, num_classes, kwargs, lr=spec.lr)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True) if ctx.cfg.eval.resume else {}
    except (OSError, RuntimeError, pickle.UnpicklingError):  # missing or damaged: train again
        saved = {}
    if isinstance(saved, dict) and saved.get("key") == key:
        module.model.load_state_dict(saved["state_dict"])
    else:
        log.info("transfer: training a %s source model for %d epochs (seed %d)", name, spec.epochs, spec.seed)
        pl.seed_everything(spec.seed, verbose=False)
        trainer_kwargs = {**_trainer_kwargs(ctx.cfg), "use_distributed_sampler": False}
        trainer = pl.Trainer(max_epochs=spec.epochs, logger=False, enable_checkpointing=False,
                             **{**trainer_kwargs, "enable_progress_bar": False})
        trainer.fit(module, train_dataloaders=dm.train_dataloader())
        if trainer.is_global_zero:
            atomic_torch_save({"key": key, "state_dict": module.model.state_dict()}, path)
    return freeze(module.model.cpu()), key


def _fraction(correct: Tensor) -> float:
    return correct.float().mean().item() if correct.numel() else float("nan")


def _threat_label(preset: AttackPreset) -> str:
    return f"{preset.norm} eps={preset.eps:.4g}"


def _worst_cases(presets: Mapping[str, AttackPreset], threats: Mapping[str, str],
                 dad: Mapping[str, Tensor], undefended: Mapping[str, Tensor]) -> dict[str, Any]:
    """Per threat model (norm, eps): per-sample worst case over the full-white-box attacks, over the classifier-only
    ones, and over every attack of that threat model (transfer included: a white-box attacker may submit any of
    these AEs, so ``all_attacks`` is the tightest bound the evaluation gives)."""
    groups: dict[str, dict[str, list[str]]] = {}
    for name, preset in presets.items():
        if threats[name] in ("defense", "classifier"):
            groups.setdefault(_threat_label(preset), {"defense": [], "classifier": []})[threats[name]].append(name)
    out: dict[str, Any] = {}
    for label, members in groups.items():
        first = presets[(members["defense"] or members["classifier"])[0]]
        entry: dict[str, Any] = {"norm": first.norm, "eps": first.eps, "white_box": None, "classifier_only": None}
        if members["defense"]:
            entry["white_box"] = {"dad": _fraction(worst_case([dad[n] for n in members["defense"]])),
                                  "attacks": members["defense"]}
        if members["classifier"]:
            entry["classifier_only"] = {
                "dad": _fraction(worst_case([dad[n] for n in members["classifier"]])),
                "undefended": _fraction(worst_case([undefended[n] for n in members["classifier"]])),
                "attacks": members["classifier"],
            }
        everything = [n for n, p in presets.items() if _threat_label(p) == label]
        entry["all_attacks"] = {"dad": _fraction(worst_case([dad[n] for n in everything])), "attacks": everything}
        entry["n"] = len(next(iter(dad.values())))
        out[label] = entry
    return out


def _detection(ctx: _Context, module: DADModule, threats: Mapping[str, str], results: Mapping[str, Any]
               ) -> tuple[dict[str, Any], dict[int, Tensor], dict[str, dict[int, Tensor]]]:
    """Detection metrics per batch size; also returns the clean and adversarial batch scores drawn."""
    detector = ctx.defense.detector
    b, n_random = ctx.batch_size, ctx.cfg.eval.random_batches
    clean_pool = module.states[CLEAN].gather("x_adv").to(ctx.device)
    calibrated = set(detector.batch_sizes.tolist())
    sizes = sorted({s for s in [*ctx.cfg.eval.detection_batch_sizes, b] if 2 <= s <= len(clean_pool)})
    # Clean batches cost no attack, so the FPR is measured on the whole test split (not only the attacked
    # `max_test` images): a larger pool sits closer to the population (its offset scales as 1/sqrt(size)).
    clean_scorer = detector.batch_scorer(ctx.fpr_pool.to(ctx.device))
    clean_scores = {s: clean_scorer(s, n_random, torch.Generator().manual_seed(s)).cpu() for s in sizes}
    attack_scores: dict[str, dict[int, Tensor]] = {}
    for name, threat in threats.items():
        if threat == "defense":  # its AEs were made for their own batch: only the attacked batches are valid draws
            attack_scores[name] = {b: module.scores[name]}
        else:
            scorer = detector.batch_scorer(module.states[name].gather("x_adv").to(ctx.device))
            attack_scores[name] = {s: scorer(s, n_random, torch.Generator().manual_seed(10_000 + s)).cpu()
                                   for s in sizes}
    pools = {name: module.states[name].gather("x_adv").to(ctx.device) for name, t in threats.items()
             if t != "defense"}
    by_size: dict[str, Any] = {}
    for s in sizes:
        entry: dict[str, Any] = {"calibrated": s in calibrated, "auroc": {}, "tpr": {}}
        if s in calibrated:
            threshold = detector.threshold_for(s).item()
            entry["threshold"] = threshold
            entry["fpr_clean"] = rate_above(clean_scores[s], threshold)
        for name, scores in attack_scores.items():
            if s in scores:
                entry["auroc"][name] = auroc(clean_scores[s], scores[s])
                if s in calibrated:
                    entry["tpr"][name] = rate_above(scores[s], entry["threshold"])
        if s in calibrated:  # whole-batch accuracy when the defense runs at this batch size
            y = ctx.y[: len(clean_pool)].to(ctx.device)
            entry["clean_acc_dad"] = _fraction(batched_predictions(ctx.defense, clean_pool, s)[0] == y)
            entry["robust_acc_dad"] = {name: _fraction(batched_predictions(ctx.defense, pool, s)[0] == y)
                                       for name, pool in pools.items()}
        by_size[str(s)] = entry
    threshold = detector.threshold_for(b).item()
    detection = {
        "threshold": threshold,
        "target_fpr": detector.target_fpr,
        "batch_size": b,
        "fpr_clean": rate_above(clean_scores[b], threshold),
        "fpr_clean_sequential": results[CLEAN]["detection_rate"],
        "random_batches": n_random,
        "clean_pool": len(ctx.fpr_pool),
        "tpr": {name: results[name]["detection_rate"] for name in threats},
        "tpr_random_batches": {name: rate_above(scores[b], threshold)
                               for name, scores in attack_scores.items() if threats[name] != "defense"},
        "auroc": {name: {str(s): by_size[str(s)]["auroc"][name] for s in sizes if name in by_size[str(s)]["auroc"]}
                  for name in threats},
        "by_batch_size": by_size,
    }
    return detection, clean_scores, attack_scores


def _mixed(ctx: _Context, module: DADModule, attack: str) -> dict[str, Any]:
    clean, adv = module.states[CLEAN].gather("x_adv"), module.states[attack].gather("x_adv")
    clean, adv, y = clean.to(ctx.device), adv.to(ctx.device), ctx.y[: len(clean)].to(ctx.device)
    b = min(ctx.batch_size, len(y))
    generator = torch.Generator().manual_seed(ctx.cfg.run.seed)
    rows = {str(p): mixed_batch_rates(ctx.defense, clean, adv, y, p, b, ctx.cfg.eval.mixed_batches, generator)
            for p in ctx.cfg.eval.mixed_fractions}
    return {"attack": attack, "batch_size": b, "fractions": rows}


def _sanity(ctx: _Context, module: DADModule, presets: Mapping[str, AttackPreset], threats: Mapping[str, str],
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

    groups: dict[str, dict[str, list[str]]] = {}
    for name, preset in presets.items():
        if threats[name] in ("defense", "classifier"):
            groups.setdefault(_threat_label(preset), {"defense": [], "classifier": []})[threats[name]].append(name)
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

    primary = [n for n in white if _threat_label(presets[n]) == _threat_label(presets[white[0]])]
    name = ctx.cfg.eval.sanity_attack or min(primary, key=lambda n: results[n]["dad"])
    base = presets[name]
    n_sub = min(ctx.cfg.eval.sanity_batches * b, len(ctx.y))
    factors = ctx.cfg.eval.sweep_factors
    variants = {run: f"sanity__{name}__eps{run[0]:g}_steps{run[1]}_eot{run[2]}_seed{run[3]}"
                for run in attack_variants(factors, randomized and base.needs_eot)[1:]}
    classifier_attack = next((n for n, p in presets.items() if threats[n] == "classifier" and p.name == "pgd"
                              and p.norm == base.norm), None)
    sweep_base = presets[classifier_attack] if classifier_attack else AttackPreset(
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
        "dad_white_box": [_fraction(sweep[f]) for f in eps],
        "dad_classifier_only": [_fraction(extra.states[sweep_names[f]].gather("dad")) for f in eps],
        "undefended": [_fraction(extra.states[sweep_names[f]].gather("undefended")) for f in eps],
    }
    return checks, sweep_report


def _plots(ctx: _Context, module: DADModule, report: dict[str, Any], clean_scores: dict[int, Tensor],
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


def _clean_json(value: Any) -> Any:
    """NaN and inf become None, so ``report.json`` is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    return value


def evaluate(cfg: PipelineConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``runs/<name>/defense.pt`` under ``cfg.eval`` and write ``report.json`` / ``report.md`` / plots."""
    start = time.perf_counter()
    paths = RunPaths(Path(run_dir) if run_dir is not None else cfg.run.dir)
    defense = load_defense(paths.defense)
    dm = _datamodule(cfg, paths)
    x, y = dm.split_tensors("test")
    fpr_pool = x  # every clean test image; the attacks below may see only the first `max_test`
    if cfg.eval.max_test is not None:
        x, y = x[: cfg.eval.max_test], y[: cfg.eval.max_test]
    presets = cfg.eval.attack_configs()
    b = cfg.defense.batch_size
    for preset in presets.values():
        preset.batch_size = b
    logger = TensorBoardLogger(save_dir=str(paths.root), name="logs", version="eval", default_hp_metric=False)
    ctx = _Context(cfg, paths, defense, x, y, b, fpr_pool, logger,
                   {"defense": sha256_file(paths.defense), "split": dm.splits.digest(), "num_test": len(y),
                    "batch_size": b, "protocol": PROTOCOL})
    threats = {name: p.threat for name, p in presets.items()}

    transfer_spec = cfg.eval.transfer_config()
    sources: dict[str, tuple[nn.Module, str]] = {}
    transfer_info = None
    if transfer_spec.attacks:
        source, source_key = _transfer_source(ctx, dm, transfer_spec)
        with torch.no_grad():
            source_acc = _fraction(source(x).argmax(1) == y)
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
        "worst_case": _worst_cases(presets, threats, dad, undefended),
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
    report = _clean_json(report)
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


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _settings(a: Mapping[str, Any]) -> str:
    parts = [f"{a['norm']} eps={a['eps']:.4g}"]
    if a["name"] in ("pgd", "mma"):
        parts.append(f"step {a['step_size']:.3g}")
    elif a["name"] == "cw_l2":
        parts.append(f"lr {a['step_size']:.3g}")
    parts.append(f"{a['steps']} steps")
    if a["threat"] == "defense":
        parts.append(f"EOT {a['eot_samples']}")
        if a["name"] == "pgd":
            parts.append(f"lambda {a['lambdas'] or [a['mmd_weight']]}")
    if a["name"] == "mma":
        parts.append(f"k={a['k']}")
    return ", ".join(parts)


def _kind(a: Mapping[str, Any]) -> str:
    if a["threat"] == "defense" and a["name"] == "pgd":
        return f"pgd/{a['objective']}"
    return a["name"] if a["threat"] != "defense" else f"{a['name']} (rand, whole batches)"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (what ``make demo`` prints)."""
    det = report["detection"]
    lines = [
        "| setting | threat | attack | undefended | DAD | detection rate | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| clean | - | - | {report['clean_acc']['undefended']:.4f} | {report['clean_acc']['dad']:.4f} | "
        f"FPR {det['fpr_clean']:.4f} (target {det['target_fpr']:.2f}) | - |",
    ]
    for name, acc in report["robust_acc"].items():
        a = report["attacks"][name]
        lines.append(f"| {name} | {a['threat']} | {_kind(a)}: {_settings(a)} | {acc['undefended']:.4f} | "
                     f"{acc['dad']:.4f} | TPR {det['tpr'][name]:.4f} | {report['timings_s']['attacks'][name]:.1f} |")
    lines += ["", "**Worst case per sample** (a sample counts as robust only if every attack of the group left it "
              "correct; each attack's batches are evaluated whole):", "",
              "| threat model | full white box: DAD | classifier-only: DAD | classifier-only: undefended "
              "| all attacks: DAD | attacks |",
              "| --- | --- | --- | --- | --- | --- |"]
    for label, w in report["worst_case"].items():
        wb, co = w["white_box"] or {}, w["classifier_only"] or {}
        lines.append(f"| {label} | **{_pct(wb.get('dad'))}** | {_pct(co.get('dad'))} | {_pct(co.get('undefended'))} "
                     f"| {_pct(w['all_attacks']['dad'])} | {', '.join(w['all_attacks']['attacks'])} |")
    sizes = list(det["by_batch_size"])
    lines += ["", "**Detection** (AUROC of batch scores, clean vs adversarial batches; TPR at the calibrated "
              "threshold; threat-`defense` AEs are made for their own batches, so only at the evaluation batch size "
              f"{det['batch_size']}):", "",
              "| batch size | " + " | ".join(sizes) + " |", "| --- |" + " --- |" * len(sizes)]
    row = [_pct(det["by_batch_size"][s].get("threshold")) for s in sizes]
    lines.append("| threshold | " + " | ".join(row) + " |")
    lines.append("| FPR clean | " + " | ".join(_pct(det["by_batch_size"][s].get("fpr_clean")) for s in sizes) + " |")
    lines.append("| DAD clean acc | " + " | ".join(_pct(det["by_batch_size"][s].get("clean_acc_dad")) for s in sizes)
                 + " |")
    for name in report["robust_acc"]:
        per_size = [det["by_batch_size"][s] for s in sizes]
        cells = [f"{_pct(e['auroc'].get(name))} / {_pct(e['tpr'].get(name))}" if name in e["auroc"] else "-"
                 for e in per_size]
        lines.append(f"| {name}: AUROC / TPR | " + " | ".join(cells) + " |")
    mixed = report.get("mixed")
    if mixed:
        lines += ["", f"**Mixed batches** ({mixed['attack']} AEs among clean images, "
                      f"batch size {mixed['batch_size']}):",
                  "", "| AE fraction | detection rate | acc clean part | acc AE part | acc all |",
                  "| --- | --- | --- | --- | --- |"]
        for p, m in mixed["fractions"].items():
            lines.append(f"| {p} | {m['detection_rate']:.4f} | {_pct(m['acc_clean_part'])} | {_pct(m['acc_adv_part'])} "
                         f"| {m['acc_all']:.4f} |")
    if report.get("transfer"):
        src = report["transfer"]["source"]
        lines += ["", f"Transfer: AEs crafted on a separately trained {src['model']} (seed {src['seed']}, clean "
                  f"accuracy {_pct(src['clean_acc'])}): " + ", ".join(report["transfer"]["attacks"]) + "."]
    lines += ["", "**Sanity checks**:", "", "| check | passed | detail |", "| --- | --- | --- |"]
    for key, c in report["sanity"].items():
        lines.append(f"| {key} | {'PASS' if c['passed'] else 'FAIL'} | {c['detail']} |")
    lines += [
        "",
        f"Denoised clean accuracy (the cost of a false positive): {report['clean_acc']['denoised']:.4f}. "
        f"Threshold {det['threshold']:.4g} at batch size {det['batch_size']}; FPR over {det['random_batches']} random "
        f"batches of the {det['clean_pool']} clean test images. {report['num_test']} test images attacked.",
        "",
        "Threat `classifier`: the attacker sees only the undefended classifier (the published setting). "
        "Threat `defense`: the attack differentiates through the whole defense (detector, noise with EOT, denoiser). "
        "Threat `transfer`: AEs crafted on another model.",
    ]
    if report.get("plots"):
        lines += ["", "Plots: " + ", ".join(report["plots"].values())]
    stages = {k: v for k, v in report["timings_s"].items() if isinstance(v, (int, float))}
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())]
    return "\n".join(lines) + "\n"
