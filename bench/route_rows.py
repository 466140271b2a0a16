"""The route leaderboard of one robust backbone (``python -m bench.robust --route-rows``): the backbone alone, DAD
with the denoiser trained against its route, DAD with the route the defense stage selected, and optionally DAD with
the published denoiser.

The method's run trains its denoiser against the purified route (``denoiser.adv_steps``) and lets its defense stage
choose among ``defense.select.routes`` (e.g. ``[denoiser, identity]``). Beside it, sibling runs share its
classifier, kernel and training AEs (copied, never retrained):

* ``<run>_published``: the same backbone and kernel with the published denoiser (``denoiser.adv_steps 0``, no
  selection). Its ``evade_denoised`` and ``autoattack_rand`` AEs, transferred to the route-trained defense
  (``eval.transfer.defenses``), are the masking check: a route whose gradients mislead the attacks through it
  would fall to AEs crafted on another. With ``published=True`` it is also evaluated, a row of its own.
* ``<run>_routekept``: where the selection kept another route, the defense with the route-trained denoiser anyway
  (``defense.select.routes []``), so that the route-trained row is measured whatever the selection chose.

The siblings' evaluations judge the classifier-only AEs the backbone's evaluation crafted (``crafted_aes/``, keyed
by the classifier's weights: the same network, linked), instead of running AutoAttack on it again. With
``parallel`` the backbone-alone evaluation runs in a second process while this one trains the siblings and
evaluates the defense (on 2 cores: one thread each, ``--threads 1``).

With ``select_published`` the published denoiser is also a candidate of the selection (``defense.select.denoisers``),
so the published sibling is trained first, from the run's classifier and kernel.

The selected row is the run's own defense. Where the selection kept the route-trained denoiser it is that row's
evaluation; where it kept another purifier (the published denoiser), the run's defense is evaluated. Where it kept
the backbone alone (``identity``), the defense classifies every image with the backbone's logits in every draw
(``tests/dad/test_route_selection.py``), so every attack meets the backbone alone: the row takes the backbone's
accuracies (``"measured": False``) and the clean FPR of its detector, which is the route-trained defense's (the
same kernel and calibration).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.leaderboard import Rows, evaluate_unless_saved, leaderboard_rows
from bench.machine import configure_threads, stage_seconds, stage_summary
from pipeline.config import ConfigError, PipelineConfig
from pipeline.paths import STAGES, RunPaths
from pipeline.stages import run_pipeline
from pipeline.trainer import quiet_third_party

__all__ = ["route_method", "run_route_method", "sibling", "with_published_candidate", "BACKBONE_PRODUCTS",
           "TRANSFERRED"]

BACKBONE_PRODUCTS = ("splits.json", "classifier", "kernel", "aes")
"""What a sibling run copies from the method's run: everything before the denoiser."""
TRANSFERRED = ("evade_denoised", "autoattack_rand")
"""Attacks through the defense crafted on the published route and transferred (where the suite has them)."""


def sibling(cfg: PipelineConfig, suffix: str, products: tuple[str, ...], adv_steps: int | None = None
            ) -> PipelineConfig:
    """The run ``<name>_<suffix>`` beside ``cfg``'s, holding copies of its finished ``products`` (skipped by the
    pipeline, never retrained), without route selection and with ``denoiser.adv_steps`` set where given."""
    source = cfg.run.dir
    sib = replace(cfg, run=replace(cfg.run, name=f"{cfg.run.name}_{suffix}"),
                  defense=replace(cfg.defense, select=replace(cfg.defense.select, routes=[])),
                  denoiser=cfg.denoiser if adv_steps is None else replace(cfg.denoiser, adv_steps=adv_steps))
    for name in products:
        target = sib.run.dir / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
            copy(source / name, target)
    return sib


def _with_transfer(cfg: PipelineConfig, published: Path) -> PipelineConfig:
    attacks = [name for name in TRANSFERRED if name in cfg.eval.attacks]
    transfer = replace(cfg.eval.transfer, defenses={**cfg.eval.transfer.defenses, "published": str(published)},
                       defense_attacks=list(dict.fromkeys([*cfg.eval.transfer.defense_attacks, *attacks])))
    return replace(cfg, eval=replace(cfg.eval, transfer=transfer))


def with_published_candidate(cfg: PipelineConfig, denoiser: Path) -> PipelineConfig:
    """``cfg`` with the published denoiser (a denoiser stage's checkpoint) among the defense stage's routes."""
    select = cfg.defense.select
    if "published" in select.routes:
        return cfg
    select = replace(select, routes=[*select.routes, "published"], denoisers={**select.denoisers,
                                                                              "published": str(denoiser)})
    return replace(cfg, defense=replace(cfg.defense, select=select))


def _share_crafted(source: Path, targets: set[Path]) -> None:
    """Sibling runs of the same classifier use ``source``'s store of classifier-only AEs (a link: AEs an evaluation
    running beside them crafts are read as they come; one saved there before is merged into it)."""
    store = source / "crafted_aes"
    store.mkdir(parents=True, exist_ok=True)
    for target in targets - {source}:
        link = target / "crafted_aes"
        if link.is_dir() and not link.is_symlink():
            shutil.copytree(link, store, dirs_exist_ok=True)
            shutil.rmtree(link)
        if not link.exists():
            link.symlink_to(store.resolve(), target_is_directory=True)


def _evaluate_alone(cfg: PipelineConfig, threads: int) -> None:
    """The backbone-alone evaluation in a process of its own (``threads`` intra-op threads)."""
    configure_threads(threads)
    quiet_third_party()
    evaluate_unless_saved(cfg, "never")


def _start_alone(cfg: PipelineConfig) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=_evaluate_alone, args=(cfg, torch.get_num_threads()),
                                                           name="backbone-alone evaluation")
    process.start()
    return process


def _join(process: multiprocessing.process.BaseProcess) -> None:
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"The {process.name} failed (exit code {process.exitcode}): see its log above")


def run_route_method(cfg: PipelineConfig, published: bool = False, select_published: bool = False,
                     parallel: bool = False) -> tuple[dict[str, Path | None], dict[str, Any]]:
    """Train and evaluate what the rows need (``select_published``: the published denoiser is a candidate of the
    selection too; ``parallel``: the backbone-alone evaluation in a second process, beside the sibling runs'
    training and the defense's evaluation); the directories of ``alone``, ``route_trained``, ``selected`` (None
    where the selected row is another's) and ``published`` (None unless evaluated), and the defense stage's
    record of its choice."""
    if len(cfg.defense.select.routes) < 2 or "denoiser" not in cfg.defense.select.routes:
        raise ConfigError("--route-rows needs the defense stage to choose among routes that include the route-trained "
                          f"denoiser (e.g. --defense.select.routes '[denoiser, identity]'), got "
                          f"{cfg.defense.select.routes}")
    run_pipeline(cfg, until="kernel")  # the published sibling needs the backbone and kernel
    pub = sibling(cfg, "published", BACKBONE_PRODUCTS, adv_steps=0)
    run_pipeline(pub)
    if select_published:
        cfg = with_published_candidate(cfg, RunPaths(pub.run.dir).product("denoiser"))
    run_pipeline(cfg)
    _share_crafted(cfg.run.dir, {pub.run.dir})
    alone = _start_alone(cfg) if parallel and not (cfg.run.dir / "report_never.json").is_file() else None
    selection = stage_summary(cfg.run.dir, "defense")["route_selection"]
    chosen = selection["chosen"]
    route = cfg if chosen == "denoiser" else sibling(cfg, "routekept", (*BACKBONE_PRODUCTS, "denoiser"))
    _share_crafted(cfg.run.dir, {route.run.dir})
    run_pipeline(route)
    if alone is None:
        evaluate_unless_saved(cfg, "never")
    evaluate_unless_saved(_with_transfer(route, pub.run.dir / "defense.pt"))
    selected = chosen not in ("denoiser", "identity")  # another purifier: the run's own defense is measured
    if selected:
        evaluate_unless_saved(cfg)
    if published:
        evaluate_unless_saved(pub)
    if alone is not None:
        _join(alone)
    return {"alone": cfg.run.dir, "route_trained": route.run.dir, "selected": cfg.run.dir if selected else None,
            "published": pub.run.dir if published else None}, selection


def route_method(cfg: PipelineConfig, method: str, threat: str | None, autoattack: str, published: bool = False,
                 select_published: bool = False, parallel: bool = False) -> tuple[Rows, dict[str, Any]]:
    """The rows of one method (alone, [published,] route-trained, selected) and the paired differences
    (:func:`run_route_method` runs what they need)."""
    runs, selection = run_route_method(cfg, published, select_published, parallel)
    rows, difference = leaderboard_rows(runs["route_trained"], method, threat, autoattack, alone_run=runs["alone"],
                                        setting="with DAD, route-trained denoiser")
    alone, trained = rows
    trained.update(route=None, route_validation=None)
    if selection["chosen"] == "denoiser":
        selected = {**trained, "measured": True}
        difference.update(selected_minus_alone=difference["dad_minus_alone"], selected_ci95=difference["ci95"])
    elif selection["chosen"] == "identity":  # the backbone's logits for every image: its accuracies, the detector's FPR
        selected = {**alone, "clean_fpr": trained["clean_fpr"], "measured": False,
                    "training_seconds": sum(stage_seconds(runs["alone"], stage) for stage in STAGES)}
        difference.update(selected_minus_alone=0.0, selected_ci95=[0.0, 0.0])
    else:
        own_rows, own = leaderboard_rows(runs["selected"], method, threat, autoattack)
        selected = {**own_rows[1], "measured": True}
        difference.update(selected_minus_alone=own["dad_minus_alone"], selected_ci95=own["ci95"])
    evidence = ("worst_case", "interval", "classifier_only", "tied")
    selected.update(setting="with DAD, selected route", route=selection["chosen"],
                    route_validation={name: {key: r[key] for key in evidence}
                                      for name, r in selection["routes"].items()})
    rows = [alone, trained, selected]
    if runs["published"] is not None:
        pub_rows, pub_difference = leaderboard_rows(runs["published"], method, threat, autoattack,
                                                    alone_run=runs["alone"], setting="with DAD, published denoiser")
        rows.insert(1, pub_rows[1])
        difference.update(published_minus_alone=pub_difference["dad_minus_alone"],
                          published_ci95=pub_difference["ci95"])
    return rows, difference
