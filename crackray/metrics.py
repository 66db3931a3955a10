"""Metrics for crack detection; crack is the positive class everywhere.

A tile is predicted crack when its probability is >= the threshold: the convention of
precision-recall curves, so a threshold read off a curve reproduces that curve's point.
torchmetrics thresholds with `>`, so hard predictions are made here and passed to it as ints.

Tile metrics use torchmetrics (the same code on a Train worker's rank 0, in `select` and in
the tests' reference checks); pixel metrics for segmentation maps use numpy/scipy with a
distance tolerance, because hand-drawn crack masks are only accurate to a pixel or two:
crackray's symmetric one and, to stand beside published tables, the SegDec papers' protocol.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Tile (image-level) metrics


def _tm():
    """torchmetrics' binary classification functions, imported on first use: importing
    torchmetrics loads torchvision and torch._dynamo (~2.7 s of CPU here), which a process that
    never scores, e.g. every Train worker but rank 0, should not pay at start-up."""
    from torchmetrics.functional import classification

    return classification


def _as_tensors(probs, targets) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.as_tensor(probs, dtype=torch.float32).detach().cpu().flatten()
    targets = torch.as_tensor(targets).detach().cpu().flatten().long()
    if probs.numel() != targets.numel() or probs.numel() == 0:
        raise ValueError(
            f"need equal, non-zero lengths: {probs.numel()} probs, {targets.numel()} targets"
        )
    return probs, targets


def _predict(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    return (probs >= threshold).long()


def classification_metrics(probs, targets, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1, AUROC and counts at `threshold`.

    A one-class target set makes some metrics meaningless (with no negatives, precision is
    trivially 1 and AUROC undefined): those are NaN, with a warning, never a fake 1.0.
    """
    probs, targets = _as_tensors(probs, targets)
    preds = _predict(probs, threshold)
    positives = int(targets.sum())
    negatives = targets.numel() - positives
    tn, fp, fn, tp = _tm().binary_confusion_matrix(preds, targets).flatten().tolist()
    out = {
        "accuracy": _tm().binary_accuracy(preds, targets).item(),
        "precision": _tm().binary_precision(preds, targets).item(),
        "recall": _tm().binary_recall(preds, targets).item(),
        "f1": _tm().binary_f1_score(preds, targets).item(),
        "auroc": float("nan"),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "threshold": float(threshold),
        "samples": targets.numel(),
        "positives": positives,
        "negatives": negatives,
    }
    if negatives == 0:
        warnings.warn(
            "metrics: the targets have no negative (no-crack) sample, so precision and AUROC "
            "are undefined and reported as NaN; check the split",
            stacklevel=2,
        )
        out["precision"] = float("nan")
    elif positives == 0:
        warnings.warn(
            "metrics: the targets have no positive (crack) sample, so recall and AUROC are "
            "undefined and reported as NaN; check the split",
            stacklevel=2,
        )
        out["recall"] = float("nan")
    else:
        out["auroc"] = _tm().binary_auroc(probs, targets).item()
    return out


def average_precision(probs, targets) -> float:
    """Area under the crack precision-recall curve (threshold-free); NaN for one class."""
    probs, targets = _as_tensors(probs, targets)
    positives = int(targets.sum())
    if positives == 0 or positives == targets.numel():
        return float("nan")
    return _tm().binary_average_precision(probs, targets).item()


def confusion_matrix(probs, targets, threshold: float = 0.5) -> list[list[int]]:
    """[[tn, fp], [fn, tp]]: rows are the true class, columns the predicted class, both in the
    order [no_crack, crack] (scikit-learn's layout with labels=[0, 1])."""
    probs, targets = _as_tensors(probs, targets)
    return _tm().binary_confusion_matrix(_predict(probs, threshold), targets).tolist()


def _pr_points(probs, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) per candidate threshold, without the curve's end point
    (precision 1, recall 0), which has no threshold."""
    probs, targets = _as_tensors(probs, targets)
    precision, recall, thresholds = _tm().binary_precision_recall_curve(probs, targets)
    n = thresholds.numel()
    return precision[:n].numpy(), recall[:n].numpy(), thresholds.numpy()


def best_f1_threshold(probs, targets) -> float:
    """The threshold whose predictions have the highest F1 (validation-set calibration)."""
    precision, recall, thresholds = _pr_points(probs, targets)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    return float(thresholds[int(np.argmax(f1))])


def threshold_for_min_precision(probs, targets, min_precision: float):
    """(threshold, recall, precision) with the highest recall whose precision >= the floor;
    among equal recalls the highest precision. None when no threshold reaches the floor."""
    precision, recall, thresholds = _pr_points(probs, targets)
    ok = np.flatnonzero(precision >= min_precision)
    if ok.size == 0:
        return None
    i = ok[np.lexsort((precision[ok], recall[ok]))[-1]]
    return float(thresholds[i]), float(recall[i]), float(precision[i])


def threshold_for_min_recall(probs, targets, min_recall: float):
    """(threshold, precision, recall) with the highest precision whose recall >= the floor;
    among equal precisions the highest recall. None when no threshold reaches the floor."""
    precision, recall, thresholds = _pr_points(probs, targets)
    ok = np.flatnonzero(recall >= min_recall)
    if ok.size == 0:
        return None
    i = ok[np.lexsort((recall[ok], precision[ok]))[-1]]
    return float(thresholds[i]), float(precision[i]), float(recall[i])


def pr_curve(probs, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) for plotting; precision and recall end at (1, 0)."""
    probs, targets = _as_tensors(probs, targets)
    return tuple(t.numpy() for t in _tm().binary_precision_recall_curve(probs, targets))


def roc_curve(probs, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, thresholds) for plotting."""
    probs, targets = _as_tensors(probs, targets)
    return tuple(t.numpy() for t in _tm().binary_roc(probs, targets))


# Pixel metrics live in their own module; these names are part of crackray.metrics' API.
from crackray.pixel_metrics import (  # noqa: E402
    PIXEL_PROTOCOLS,
    PIXEL_THRESHOLDS,
    SEGDEC_THRESHOLDS,
    pixel_counts,
    pixel_metrics,
    sweep_pixel_threshold,
)

__all__ = [
    "PIXEL_PROTOCOLS", "PIXEL_THRESHOLDS", "SEGDEC_THRESHOLDS", "average_precision",
    "best_f1_threshold", "classification_metrics", "confusion_matrix", "pixel_counts",
    "pixel_metrics", "pr_curve", "roc_curve", "sweep_pixel_threshold",
    "threshold_for_min_precision", "threshold_for_min_recall",
]
