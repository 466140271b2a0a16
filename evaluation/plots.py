"""Figures of an evaluation: detection ROC, MMD score histograms, accuracy vs eps, mixed batches, image grid.

Figures are built with matplotlib's object interface (``Figure`` rendered by the Agg canvas, no pyplot
state, no display needed), saved as PNG files atomically and logged to TensorBoard by the caller.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

from dad.io import atomic_open

__all__ = [
    "roc_figure", "score_histogram_figure", "accuracy_vs_eps_figure", "mixed_batches_figure", "image_grid_figure",
    "save_figure",
]


def _distinct_colors(ax: Axes, n: int) -> None:
    """Give up to 20 lines distinct colours (the default cycle repeats after 10)."""
    ax.set_prop_cycle(color=colormaps["tab10" if n <= 10 else "tab20"].colors)


def roc_figure(curves: Mapping[str, tuple[Tensor, Tensor, float]], batch_size: int) -> Figure:
    """ROC curves of the batch score, clean vs each attack: ``{name: (fpr, tpr, auroc)}``."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    _distinct_colors(ax, len(curves))
    for name, (fpr, tpr, area) in curves.items():
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{name} (AUROC {area:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate (clean batches)", ylabel="true positive rate (adversarial batches)",
           title=f"Detection ROC, batch size {batch_size}", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def score_histogram_figure(clean: Tensor, attacks: Mapping[str, Tensor], threshold: float, batch_size: int) -> Figure:
    """Histograms of batch MMD scores (clean and each attack) with the calibrated threshold."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    _distinct_colors(ax, len(attacks) + 1)
    everything = [clean, *attacks.values()]
    low = min(float(s.min()) for s in everything if s.numel())
    high = max(float(s.max()) for s in everything if s.numel())
    bins = [low + (high - low) * i / 60 for i in range(61)] if high > low else 10
    ax.hist(clean.numpy(), bins=bins, density=True, alpha=0.5, label="clean")
    for name, scores in attacks.items():
        ax.hist(scores.numpy(), bins=bins, density=True, histtype="step", linewidth=1.5, label=name)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set(xlabel="batch MMD^2 score", ylabel="density", title=f"Detector scores, batch size {batch_size}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def accuracy_vs_eps_figure(eps: Sequence[float], curves: Mapping[str, Sequence[float]], chance: float,
                           norm: str) -> Figure:
    """Robust accuracy against the attack radius, one line per setting (undefended, DAD, ...)."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    for name, accs in curves.items():
        ax.plot(list(eps), list(accs), marker="o", label=name)
    ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set(xlabel=f"eps ({norm})", ylabel="accuracy", ylim=(-0.02, 1.02), title="Accuracy vs attack radius")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def mixed_batches_figure(fractions: Sequence[float], rows: Mapping[str, Sequence[float | None]], attack: str) -> Figure:
    """Detection rate and accuracies on batches mixing clean images and a fraction of AEs."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    for name, values in rows.items():
        points = [(p, v) for p, v in zip(fractions, values) if v is not None]
        ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set(xlabel="fraction of AEs in the batch", ylabel="rate", ylim=(-0.02, 1.02), title=f"Mixed batches ({attack})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def image_grid_figure(rows: Mapping[str, Tensor], title: str) -> Figure:
    """One row of images per entry (e.g. clean / adversarial / denoised), images in [0, 1]."""
    fig = Figure(figsize=(1.0 * max(len(r) for r in rows.values()) + 1.5, 1.1 * len(rows) + 0.6))
    for i, (name, images) in enumerate(rows.items()):
        ax = fig.add_subplot(len(rows), 1, i + 1)
        grid = make_grid(images.clamp(0, 1), nrow=len(images), padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest", vmin=0, vmax=1)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    fig.suptitle(title, fontsize=9)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Write the figure as a PNG file, atomically."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
