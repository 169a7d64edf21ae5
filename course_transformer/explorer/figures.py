"""Matplotlib figures of attention: one head's heatmap, every head of a layer, the head view (lines)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: gradio renders the figure to an image
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def heatmap(matrix: np.ndarray, queries: list[str], keys: list[str], title: str) -> Figure:
    """(T, S) weights: row = query, column = key; each row sums to 1."""
    size = max(3.5, 0.18 * max(len(queries), len(keys)) + 2.0)
    fig, ax = plt.subplots(figsize=(size, size), dpi=80)
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(float(matrix.max()), 1e-6), aspect="auto")
    ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=7)
    ax.set_yticks(range(len(queries)), queries, fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def head_grid(layer: np.ndarray, title: str) -> Figure:
    """(H, T, S): every head of one layer, small, without labels (the heatmap above has them)."""
    num_heads = layer.shape[0]
    columns = min(num_heads, 6)
    rows = -(-num_heads // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.6 * rows + 0.4), dpi=70, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index < num_heads:
            ax.imshow(layer[index], cmap="Blues", vmin=0, vmax=1, aspect="auto")
            ax.set_title(f"head {index + 1}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def head_view(matrix: np.ndarray, queries: list[str], keys: list[str], title: str) -> Figure:
    """BertViz's head view as a static figure: queries on the left, keys on the right, a line per pair whose
    opacity is the weight (lines under 0.05 are left out: they would only grey the picture)."""
    height = max(3.0, 0.22 * max(len(queries), len(keys)) + 1.0)
    fig, ax = plt.subplots(figsize=(4.2, height), dpi=80)
    q_y, k_y = -np.arange(len(queries)), -np.arange(len(keys))
    for q, k in zip(*np.nonzero(matrix >= 0.05)):
        ax.plot([0, 1], [q_y[q], k_y[k]], color="tab:blue", alpha=float(matrix[q, k]), linewidth=2)
    for y, token in zip(q_y, queries):
        ax.text(-0.05, y, token, ha="right", va="center", fontsize=8)
    for y, token in zip(k_y, keys):
        ax.text(1.05, y, token, ha="left", va="center", fontsize=8)
    ax.set_xlim(-0.8, 1.8)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def warm_up() -> None:
    """Matplotlib's first figure loads fonts and the backend: do it while the model loads."""
    close(heatmap(np.eye(2), ["a", "b"], ["a", "b"], "warm-up"))


def close(*figures: Figure) -> None:
    for fig in figures:
        plt.close(fig)
