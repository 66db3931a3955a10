"""Figures for MLflow artifacts and reports (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on workers, CI or clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CLASS_NAMES = ("no crack", "crack")


def confusion_matrix_figure(matrix: list[list[int]], title: str = "Confusion matrix"):
    """Rows: true class, columns: predicted class, in the order (no crack, crack)."""
    counts = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(counts, cmap="Blues")
    for (i, j), value in np.ndenumerate(counts):
        color = "white" if value > counts.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color, fontsize=12)
    ax.set_xticks([0, 1], CLASS_NAMES)
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def curve_figure(x, y, *, xlabel: str, ylabel: str, title: str, diagonal: bool = False):
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.plot(x, y, lw=2)
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def history_figure(history: list[dict], keys: list[str], title: str, ylabel: str = ""):
    """Per-epoch curves of the given metric keys."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    epochs = [row["epoch"] for row in history]
    for key in keys:
        values = [row.get(key, np.nan) for row in history]
        ax.plot(epochs, values, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def param_figure(points: list[tuple], param: str, metric: str, log: bool = False):
    """One searched parameter against the job's metric, a dot per trial."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    xs, ys = zip(*points, strict=True)
    if all(isinstance(x, int | float) for x in xs):
        ax.scatter(xs, ys)
        if log:
            ax.set_xscale("log")
    else:  # categorical: one column per choice
        labels = sorted({str(x) for x in xs})
        ax.scatter([labels.index(str(x)) for x in xs], ys)
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def mask_overlay_figure(images, masks, seg_probs, crack_probs, threshold: float, title: str):
    """One row per image: the image with its ground-truth mask (green), then with the predicted
    mask at `threshold` (red, over the faint probability map); row titles give p(crack).

    images uint8 (N, H, W, 3); masks (N, H, W) in {0, 1}; seg_probs float (N, H, W) in 0..1.
    """
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(4.4, 2.2 * n), squeeze=False)
    for row, (image, mask, prob, p_crack) in enumerate(
        zip(images, masks, seg_probs, crack_probs, strict=True)
    ):
        truth, predicted = axes[row]
        truth.imshow(image)
        truth.imshow(np.ma.masked_where(mask == 0, mask), cmap="summer", alpha=0.7, vmin=0, vmax=1)
        truth.set_title("ground truth" if row == 0 else "", fontsize=8)
        predicted.imshow(image)
        # Masked below 0.1: the colour map's white end would otherwise wash out the image.
        predicted.imshow(
            np.ma.masked_where(prob < 0.1, prob), cmap="Reds", alpha=0.35, vmin=0, vmax=1
        )
        hard = prob >= threshold
        predicted.imshow(np.ma.masked_where(~hard, hard), cmap="autumn", alpha=0.8)
        predicted.set_title(f"p(crack) {p_crack:.2f}", fontsize=8)
        for ax in (truth, predicted):
            ax.set_axis_off()
    fig.suptitle(f"{title} (pixel threshold {threshold:.2f})", fontsize=9)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
