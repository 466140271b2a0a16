"""The evaluation report as Markdown (what ``eval.py`` prints and writes to ``report.md``) and as strict JSON."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dad.routing import ROUTERS

__all__ = ["report_markdown", "strict_json"]


def strict_json(value: Any) -> Any:
    """NaN and inf become None, so ``report.json`` is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _ci(value: float | None, interval: list[float] | None) -> str:
    """``0.8422 [0.806, 0.873]``."""
    if value is None:
        return "n/a"
    if not interval or interval[0] is None:
        return f"{value:.4f}"
    return f"{value:.4f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _settings(a: Mapping[str, Any]) -> str:
    parts = [f"{a['norm']} eps={a['eps']:.4g}"]
    if a["name"] in ("pgd", "mma"):
        parts.append(f"step {a['step_size']:.3g}")
    elif a["name"] == "cw_l2":
        parts.append(f"lr {a['step_size']:.3g}")
    parts.append(f"{a['steps']} {'queries' if a['name'] == 'square' else 'steps'}")
    if a["name"] in ("pgd", "apgd"):
        parts.append(f"loss {a['loss']}")
    if a["restarts"] > 1:
        parts.append(f"{a['restarts']} restarts")
    if a["threat"] == "defense":
        parts.append(f"EOT {a['eot_samples']}, {a['draws']} draws")
        if a["name"] in ("pgd", "apgd"):
            parts.append(f"lambda {a['lambdas'] or [a['mmd_weight']]}")
    if a["name"] == "mma":
        parts.append(f"k={a['k']}")
    return ", ".join(parts)


def _kind(a: Mapping[str, Any]) -> str:
    if a["threat"] == "defense" and a["name"] in ("pgd", "apgd"):
        return f"{a['name']}/{a['objective']}"
    return a["name"]


def _headline(report: dict[str, Any]) -> list[str]:
    mixed_names = list(report.get("mixed") or {})
    header = ["threat model", "headline (worst)", "whole batches: all attacks", "full white box",
              "classifier-only: DAD / undefended", "subset + stronger re-runs",
              *(f"mixed {report['mixed'][m]['attack']} at {report['mixed'][m]['fraction']:g}" for m in mixed_names)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label, w in report["worst_case"].items():
        head, wb, co, fold = w["headline"], w["white_box"] or {}, w["classifier_only"] or {}, w.get("folded")
        cells = [label, f"**{_ci(head['dad'], head['ci95'])}** ({head['source']}, n={head['n']})",
                 _ci(w["all_attacks"]["dad"], w["all_attacks"]["ci95"]), _ci(wb.get("dad"), wb.get("ci95")),
                 f"{_pct(co.get('dad'))} / {_pct(co.get('undefended'))}",
                 (f"{_ci(fold['dad'], fold['ci95'])} (n={fold['n']}, {fold['extra_errors']} more errors)"
                  if fold else "-")]
        cells += [_ci(w["mixed"][m]["dad"], w["mixed"][m]["ci95"]) if m in w["mixed"] else "-" for m in mixed_names]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _purification(report: Mapping[str, Any]) -> str:
    """What the purification path is: the denoiser, or the diffusion purifier's settings."""
    p = report.get("purifier")
    where = f"`{report.get('defense_file', 'defense.pt')}`"
    if not p:
        return f"noise + denoiser ({where}){_route(report)}"
    if p["kind"] == "identity":
        return f"none, the backbone alone classifies flagged images ({where}){_route(report)}"
    steps = f"{p['ddim_steps']} DDIM steps" if p["sampler"] == "ddim" else "DDPM ancestral steps"
    if p["kind"] == "fixed":
        return f"diffusion purifier, fixed t* = {p['t_star']}, {steps} ({where})"
    return (f"SSNI ({p['mapping']} mapping), t* = {p['t_star']}, b = {p['bias']:g}, EPS over K = "
            f"{p['eps_num_timesteps']} timesteps in (0, {p['eps_max_timestep']:g}], {steps} ({where})")


def _route(report: Mapping[str, Any]) -> str:
    """The flagged route's classifier where it is a second one, and how the defense stage chose the route, if it
    chose: each candidate's validation worst case."""
    flagged = report.get("flagged_classifier")
    second = f"; a second classifier (`{flagged['name']}`) classifies flagged images" if flagged else ""
    chosen = report.get("route_selection")
    if not chosen:
        return second
    routes = ", ".join(f"{name} {_ci(r['worst_case'], r['interval'])}" + (" tied" if r["tied"] else "")
                       for name, r in chosen["routes"].items())
    n = next(iter(chosen["routes"].values()))["n"]
    return (f"{second}; route `{chosen['chosen']}` kept by the defense stage: worst case under "
            f"{', '.join(chosen['attacks'])} on {n} held-out images: {routes}")


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (what ``make demo`` prints)."""
    lines = [f"DAD with **{report['routing']}** routing: {ROUTERS[report['routing']].summary}",
             f"Purification: {_purification(report)}", "",
             f"**Worst case per threat model** (DAD's accuracy with its 95% interval; a sample is robust only if "
             f"it is right in all {report['draws']} noise draws and every attack of the column left it correct; the "
             "headline is the lowest column):", "", *_headline(report), "",
             *_attacks_table(report), *_mixed_table(report), *_cost_table(report), *_detection_tables(report),
             *_sanity_lines(report),
             *_closing_lines(report)]
    return "\n".join(lines) + "\n"


def _attacks_table(report: dict[str, Any]) -> list[str]:
    det, clean = report["detection"], report["clean_acc"]
    lines = [f"**Attacks** ({report['num_test']} test images; attacks through the defense on the first "
             f"{report['num_test_defense']}):", "",
             "| setting | threat | attack | undefended | DAD (all draws) [95% CI] | DAD, mean over draws | "
             "DAD - undefended [95% CI] | detection rate | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| clean | - | - | {_pct(clean['undefended'])} | {_ci(clean['dad'], clean['dad_ci95'])} | "
             f"{_pct(clean['dad_mean'])} | {_ci(*_split(clean['dad_minus_undefended']))} | "
             f"purified {det['clean_purified']:.4f} (target {det['target_fpr']:.2f}) | - |"]
    for name, acc in report["robust_acc"].items():
        a = report["attacks"][name]
        lines.append(f"| {name} | {a['threat']} | {_kind(a)}: {_settings(a)} | {_pct(acc['undefended'])} | "
                     f"{_ci(acc['dad'], acc['dad_ci95'])} | {_pct(acc['dad_mean'])} | "
                     f"{_ci(*_split(acc['dad_minus_undefended']))} | {_pct(det['tpr'][name])} | "
                     f"{report['timings_s']['attacks'][name]:.1f} |")
    return lines


def _mixed_table(report: dict[str, Any]) -> list[str]:
    mixed = report.get("mixed") or {}
    if not mixed:
        return []
    lines = ["", f"**Mixed batches** (each attacked image is an AE among clean images of other test images, in a "
                 f"batch of {report['detection']['batch_size']}; threat `defense`: the attack sees and scores the "
                 "whole batch):", "",
             "| mixed attack | AE fraction | threat | n | DAD on the AEs [95% CI] | mean over draws | "
             "batches flagged | accuracy on the clean filler | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in mixed.items():
        lines.append(f"| {m['attack']} | {m['fraction']:g} | {m['threat']} | {m['n']} | "
                     f"{_ci(m['dad'], m['dad_ci95'])} | {_pct(m['dad_mean'])} | {_pct(m['detection_rate'])} | "
                     f"{_pct(m['filler_acc'])} | {report['timings_s']['attacks'][name]:.1f} |")
    return lines


def _cost_table(report: dict[str, Any]) -> list[str]:
    cost = report.get("attack_cost") or {}
    if not cost:
        return []
    lines = ["", "**Attack cost** (per defense batch: single-draw passes of the defense the whole budget costs in a "
                 "loop, the passes made, the batched programs that made them, and the share of batches whose attack "
                 "stopped early, every sample wrong in every judged draw):", "",
             "| attack | passes, whole budget | passes made | programs | stopped early |",
             "| --- | --- | --- | --- | --- |"]
    for name, c in cost.items():
        budget = "-" if c["budget_passes"] is None else f"{c['budget_passes']:.0f}"
        lines.append(f"| {name} | {budget} | {c['passes']:.0f} | {c['programs']:.0f} | {_pct(c['stopped_early'])} |")
    return lines


def _detection_tables(report: dict[str, Any]) -> list[str]:
    det = report["detection"]
    sizes = list(det["by_batch_size"])
    by_size = [det["by_batch_size"][s] for s in sizes]
    lines = ["", "**Detection** (AUROC of batch scores, clean vs adversarial batches; TPR at the calibrated "
             "threshold; threat-`defense` AEs are made for their own batches, so only at the evaluation batch size "
             f"{det['batch_size']}):", "",
             "| batch size | " + " | ".join(sizes) + " |", "| --- |" + " --- |" * len(sizes)]
    for label, key in (("threshold", "threshold"), ("FPR clean", "fpr_clean"), ("DAD clean acc", "clean_acc_dad")):
        lines.append(f"| {label} | " + " | ".join(_pct(e.get(key)) for e in by_size) + " |")
    for name in report["robust_acc"]:
        cells = [f"{_pct(e['auroc'].get(name))} / {_pct(e['tpr'].get(name))}" if name in e["auroc"] else "-"
                 for e in by_size]
        lines.append(f"| {name}: AUROC / TPR | " + " | ".join(cells) + " |")
    sample = det.get("per_sample")
    if sample:
        names = list(sample["auroc"])
        lines += ["", f"**Per-sample detection** ({sample['score']} score; threshold {sample['threshold']:.4g}, "
                      f"clean test images above it: {sample['fpr_clean']:.4f}):", "",
                  "| attack | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names),
                  "| AUROC / TPR | "
                  + " | ".join(f"{_pct(sample['auroc'][n])} / {_pct(sample['tpr'][n])}" for n in names) + " |"]
    transfer = report.get("transfer") or {}
    if transfer.get("source"):
        src = transfer["source"]
        lines += ["", f"Transfer: AEs crafted on a separately trained {src['model']} (seed {src['seed']}, clean "
                  f"accuracy {_pct(src['clean_acc'])}): " + ", ".join(transfer["attacks"]) + "."]
    if transfer.get("defenses"):
        files = ", ".join(f"{name} (`{path}`)" for name, path in transfer["defenses"].items())
        lines += ["", f"Transfer from other defenses: AEs crafted through {files}, judged on this one: "
                  + ", ".join(transfer["defense_attacks"]) + "."]
    return lines


def _sanity_lines(report: dict[str, Any]) -> list[str]:
    lines = ["", "**Sanity checks**:", "", "| check | passed | detail |", "| --- | --- | --- |"]
    for key, c in report["sanity"].items():
        lines.append(f"| {key} | {'PASS' if c['passed'] else 'FAIL'} | {c['detail']} |")
    det = report["detection"]
    fpr = det["fpr_check"]
    if fpr is not None:
        lines += ["", f"FPR check: `{fpr['formula']}` with N_test = {det['clean_pool']}, B = {fpr['batch_size']}, "
                      f"N_cal = {fpr['calibration_pool']}, z = {fpr['z']:g}: tolerance {fpr['tolerance']:.4f} "
                      f"(binomial {fpr['se_binomial']:.4f}, calibration {fpr['se_calibration']:.4f})."]
    return lines


def _closing_lines(report: dict[str, Any]) -> list[str]:
    det = report["detection"]
    lines = [
        "",
        f"Denoised clean accuracy (the cost of a false positive): {_pct(report['clean_acc']['denoised'])}. "
        f"Threshold {det['threshold']:.4g} at batch size {det['batch_size']}; FPR over {det['random_batches']} random "
        f"batches of the {det['clean_pool']} clean test images.",
        "",
        "Threat `classifier`: the attacker sees only the undefended classifier (the published setting). "
        "Threat `defense`: the attack differentiates through the whole defense (detector, noise with EOT, denoiser); "
        "its candidate batches are judged whole over several noise draws. Threat `transfer`: AEs crafted on another "
        "model.",
    ]
    if report.get("plots"):
        lines += ["", "Plots: " + ", ".join(report["plots"].values())]
    stages = {k: v for k, v in report["timings_s"].items() if isinstance(v, (int, float))}
    return lines + ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())]


def _split(difference: list[float]) -> tuple[float, list[float]]:
    """``[d, lo, hi]`` -> ``(d, [lo, hi])``."""
    return difference[0], difference[1:]
