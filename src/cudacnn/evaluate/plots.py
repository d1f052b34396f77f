"""PNG plots with matplotlib's Agg backend (no display needed): training curves and a confusion heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from cudacnn.atomic import atomic_output  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Save atomically, so a reader never sees half a PNG; the figure is closed either way."""
    try:
        with atomic_output(path, ".png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return Path(path)


def series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None and "epoch" in r]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves_figure(records: list[dict]):
    """Loss, accuracy and learning rate per epoch from metrics.jsonl records. Constrained layout makes room for
    every panel's tick labels (the learning rate's are long), so no panel's labels run into its neighbour."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    for ax, metric, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            x, y = series(records, f"{split}_{metric}")
            if x:
                ax.plot(x, y, style, markersize=3, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    x, y = series(records, "lr")
    if x:
        axes[2].plot(x, y, "-o", markersize=3, color="tab:green")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    axes[2].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))  # 0.0021, not 0.00210
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_training_curves(records: list[dict], path: Path) -> Path:
    return save_figure(training_curves_figure(records), path)


def plot_confusion(cm, classes: list[str], path: Path) -> Path:
    """Heatmap coloured by each true class's fraction (rows sum to 1), annotated with raw counts."""
    cm = np.asarray(cm)
    k = len(classes)
    rows = np.maximum(cm.sum(1, keepdims=True), 1)
    frac = cm / rows
    size = max(4.5, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:  # counts stay legible up to ~20 classes
        fontsize = 11 if k <= 5 else 8 if k <= 12 else 6
        for t in range(k):
            for p in range(k):
                ax.text(p, t, str(int(cm[t, p])), ha="center", va="center", fontsize=fontsize,
                        color="white" if frac[t, p] > 0.5 else "black")
    ax.set_title("confusion matrix (test)")
    return save_figure(fig, path)
