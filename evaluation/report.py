"""The evaluation report as Markdown (what ``eval.py`` prints and writes to ``report.md``) and as strict JSON."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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
