"""Matplotlib figures, written atomically as PNG (Agg backend: no display needed).

Plotting takes plain scores, rows and matrices, never a model, so the study's figures can be redrawn from its
``results.json``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from avss.io import atomic_write
from avss.scorers.avss import LayerScores


def save_figure(figure: plt.Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG through a temporary file and close it."""
    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(figure)


def plot_layer_scores(
    scores: LayerScores, path: str | Path, removed: list[int] | None = None, title: str = ""
) -> Path:
    """Bar chart of normalized AVSS per layer over its normalized variance and sparsity; removed in red."""
    removed = set(removed or [])
    layers = list(range(scores.num_layers))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * len(layers)), 6), sharex=True)
    colors = ["tab:red" if layer in removed else "tab:blue" for layer in layers]
    top.bar(layers, scores.avss_normalized.tolist(), color=colors)
    top.set_ylabel("normalized AVSS")
    top.set_title(title or "AVSS per layer (red: removed)")
    bottom.plot(layers, scores.variance_normalized.tolist(), marker="o", label="variance (normalized)")
    bottom.plot(layers, scores.sparsity_normalized.tolist(), marker="s", label="sparsity (normalized)")
    bottom.set_xlabel("layer")
    bottom.set_ylabel("share over layers")
    bottom.legend()
    return save_figure(figure, path)


def retention_vs_fraction(rows: list[dict[str, Any]], bands: list[dict[str, Any]], path: Path) -> Path:
    """One panel per task metric against the fraction removed: chance-normalized retention (accuracies) or
    the change of the metric (perplexity: NLL per token), with 95% error bars, one line per method and mode,
    and the random order's 5-95% band shaded."""
    panels = list(dict.fromkeys((row["task"], row["metric"]) for row in rows))
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.8 * lines), squeeze=False)
    for axis, (task, metric) in zip(axes.flat, panels, strict=False):
        selected = [row for row in rows if (row["task"], row["metric"]) == (task, metric)]
        accuracy = selected[0]["kind"] == "accuracy"
        key = "retention" if accuracy else "difference"
        series = list(
            dict.fromkeys(
                (row["method"], row["mode"]) for row in selected if not row["method"].startswith("random")
            )
        )
        # Methods side by side around each budget, so error bars at the same fraction do not hide each other.
        fractions = sorted({row["fraction"] for row in selected})
        spacing = min((b - a for a, b in itertools.pairwise(fractions)), default=0.1)
        for index, (method, mode) in enumerate(series):
            shift = 0.6 * spacing * ((index + 0.5) / len(series) - 0.5)
            points = sorted(
                (row["fraction"], row[key], row[f"{key}_low"], row[f"{key}_high"])
                for row in selected
                if (row["method"], row["mode"]) == (method, mode) and row[key] is not None
            )
            if not points:
                continue
            x, y, low, high = (list(values) for values in zip(*points, strict=True))
            x = [value + shift for value in x]
            errors = [
                [v - lo for v, lo in zip(y, low, strict=True)],
                [hi - v for v, hi in zip(y, high, strict=True)],
            ]
            axis.errorbar(
                x,
                y,
                yerr=errors,
                marker="o",
                capsize=3,
                linestyle="-" if mode == "oneshot" else "--",
                label=method if mode == "oneshot" else f"{method} ({mode})",
            )
        band = sorted(
            (b["fraction"], b["low"], b["median"], b["high"])
            for b in bands
            if (b["task"], b["metric"], b["mode"]) == (task, metric, "oneshot")
        )
        if band:
            x, low, median, high = (list(values) for values in zip(*band, strict=True))
            axis.fill_between(x, low, high, color="grey", alpha=0.25, label="random (5-95%)")
            axis.plot(x, median, color="grey", linewidth=1)
        axis.axhline(1.0 if accuracy else 0.0, color="grey", linewidth=0.8, linestyle=":")
        if accuracy:
            axis.axhline(0.0, color="black", linewidth=0.6)
        axis.set_title(f"{task}: {metric}")
        axis.set_xlabel("fraction of layers removed")
        axis.set_ylabel(
            "chance-normalized retention" if accuracy else f"change ({selected[0]['difference_unit']})"
        )
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, 1.08))
    return save_figure(figure, path)


def removed_layers(matrix: dict[str, list[float]], num_layers: int, path: Path) -> Path:
    """Rows: methods; columns: layers; colour: the smallest fraction at which the layer is removed."""
    names = list(matrix)
    values = np.array([matrix[name] for name in names], dtype=float)
    figure, axis = plt.subplots(figsize=(max(6, 0.3 * num_layers + 3), 0.4 * len(names) + 1.5))
    image = axis.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis_r")
    axis.set_yticks(range(len(names)), names)
    axis.set_xticks(range(num_layers))
    axis.set_xlabel("layer (blank: never removed)")
    figure.colorbar(image, ax=axis, label="removed from fraction")
    return save_figure(figure, path)


def correlation_heatmap(correlations: dict[str, Any], path: Path) -> Path:
    """Spearman (left) and Kendall (right) rank correlations between the methods' layer scores."""
    methods = correlations["methods"]
    figure, axes = plt.subplots(1, 2, figsize=(2 * (0.6 * len(methods) + 3), 0.6 * len(methods) + 2))
    for axis, kind in zip(axes, ("spearman", "kendall"), strict=True):
        values = np.array(correlations[kind], dtype=float)
        image = axis.imshow(values, vmin=-1, vmax=1, cmap="coolwarm")
        axis.set_xticks(range(len(methods)), methods, rotation=60, ha="right")
        axis.set_yticks(range(len(methods)), methods)
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        axis.set_title(kind)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return save_figure(figure, path)
