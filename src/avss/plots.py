"""Matplotlib figures, written atomically as PNG (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from avss.io import atomic_write  # noqa: E402
from avss.scores import LayerScores  # noqa: E402


def save_figure(figure: plt.Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG through a temporary file and close it."""
    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(figure)


def plot_layer_scores(scores: LayerScores, path: str | Path, removed: list[int] | None = None, title: str = "") -> Path:
    """Bar chart of normalized AVSS per layer with its normalized variance and sparsity; removed layers in red."""
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
