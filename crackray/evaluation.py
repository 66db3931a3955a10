"""Turning evaluation outputs into metrics, tables and artifact objects (the caller logs them).

Used per epoch by the Train workers (validation), once at the end of a run for the test
split, and by `select` / `report`. Crack is the positive class throughout.
"""

from __future__ import annotations

import numpy as np
import torch

from crackray.data.transforms import to_model_input
from crackray.engine import EvalOutputs, seg_probabilities
from crackray.metrics import (
    average_precision,
    best_f1_threshold,
    classification_metrics,
    confusion_matrix,
    pixel_metrics,
    pr_curve,
    roc_curve,
    sweep_pixel_threshold,
    threshold_for_min_precision,
)

_COUNT_KEYS = ("tp", "fp", "fn", "tn", "samples", "positives", "negatives")


def split_metrics(outputs: EvalOutputs, prefix: str, threshold: float = 0.5) -> dict[str, float]:
    """`{prefix}/loss, accuracy, precision, recall, f1, auroc, tp, ...` at `threshold`."""
    metrics = classification_metrics(outputs.probs, outputs.targets, threshold=threshold)
    out = {f"{prefix}/{key}": float(value) for key, value in metrics.items()}
    out[f"{prefix}/loss"] = outputs.loss
    return out


def ranking_metrics(outputs: EvalOutputs, prefix: str, min_precision: float) -> dict[str, float]:
    """Threshold-free scores of how well the crack probabilities rank tiles: `ap` (average
    precision), `f1_best` (F1 at this split's own best threshold, `f1_best_threshold`) and
    `recall_at_precision` (the highest recall whose precision >= `min_precision`, 0 if none).
    They do not move when a loss or a sampling choice shifts the calibration."""
    if len(set(outputs.targets.tolist())) < 2:
        return {}  # undefined with one class (warned about at start): not logged
    threshold = best_f1_threshold(outputs.probs, outputs.targets)
    at_best = classification_metrics(outputs.probs, outputs.targets, threshold)
    floor = threshold_for_min_precision(outputs.probs, outputs.targets, min_precision)
    return {
        f"{prefix}/ap": average_precision(outputs.probs, outputs.targets),
        f"{prefix}/f1_best": float(at_best["f1"]),
        f"{prefix}/f1_best_threshold": threshold,
        f"{prefix}/recall_at_precision": floor[1] if floor else 0.0,
    }


def per_surface_metrics(outputs: EvalOutputs, prefix: str, threshold: float) -> dict[str, float]:
    """The same metrics for each surface (SDNET: D decks, P pavements, W walls), and each
    surface's average precision where it has both classes."""
    out = {}
    for surface in sorted(set(outputs.surfaces.tolist())):
        keep = outputs.surfaces == surface
        probs, targets = outputs.probs[keep], outputs.targets[keep]
        metrics = classification_metrics(probs, targets, threshold=threshold)
        for key in ("precision", "recall", "f1", "auroc", "accuracy", "samples", "positives"):
            out[f"{prefix}/{surface}/{key}"] = float(metrics[key])
        if 0 < targets.sum() < len(targets):
            out[f"{prefix}/{surface}/ap"] = average_precision(probs, targets)
    return out


def pixel_split_metrics(
    outputs: EvalOutputs,
    prefix: str,
    threshold: float | None = None,
    segdec_threshold: float | None = None,
) -> tuple[float, dict[str, float]]:
    """Pixel metrics of segmentation maps under both protocols, each at its own threshold:
    `{prefix}/pixel_*` (crackray's symmetric 2-px tolerance) and `{prefix}/segdec_*` (the SegDec
    papers' 2-pixel-distance protocol), with `pixel_threshold` / `segdec_threshold`.

    `threshold=None` marks a validation split: both thresholds are swept (a given
    `segdec_threshold` is applied instead). Otherwise `threshold` is applied (test), and the
    segdec metrics are reported only at a given `segdec_threshold` (the validation one), so a
    test split never picks its own. Returns (symmetric threshold, metrics).
    """
    preds = [m.astype(np.float32) / 255.0 for m in outputs.seg_probs]
    gts = [m.astype(bool) for m in outputs.masks]
    validation = threshold is None
    if validation:
        threshold, metrics = sweep_pixel_threshold(preds, gts, tolerance=2)
    else:
        metrics = pixel_metrics(preds, gts, threshold=threshold, tolerance=2)
    out = {f"{prefix}/pixel_{key}": float(value) for key, value in metrics.items()}
    out[f"{prefix}/pixel_threshold"] = float(threshold)
    segdec = None
    if segdec_threshold is not None:
        segdec = pixel_metrics(preds, gts, segdec_threshold, tolerance=2, protocol="segdec")
    elif validation:
        _, segdec = sweep_pixel_threshold(preds, gts, tolerance=2, protocol="segdec")
    if segdec is not None:
        out.update({f"{prefix}/segdec_{key}": float(value) for key, value in segdec.items()})
    return threshold, out


def decision_artifacts(outputs: EvalOutputs, threshold: float, name: str) -> dict:
    """Confusion matrix (PNG + JSON), PR and ROC curves of one split, keyed by their artifact
    file under `name/` (JSON-ready dicts and matplotlib figures; the caller logs them)."""
    from crackray import plots  # matplotlib: 0.6 s to import in every Train worker otherwise

    matrix = confusion_matrix(outputs.probs, outputs.targets, threshold)
    artifacts = {
        f"{name}/confusion_matrix.json": {
            "layout": "rows=true [no_crack, crack], cols=predicted [no_crack, crack]",
            "threshold": threshold,
            "matrix": matrix,
        },
        f"{name}/confusion_matrix.png": plots.confusion_matrix_figure(
            matrix, f"{name} @ {threshold:.2f}"
        ),
    }
    if len(set(outputs.targets.tolist())) == 2:  # curves need both classes
        precision, recall, _ = pr_curve(outputs.probs, outputs.targets)
        artifacts[f"{name}/pr_curve.png"] = plots.curve_figure(
            recall, precision, xlabel="recall", ylabel="precision", title=f"{name} PR (crack)"
        )
        fpr, tpr, _ = roc_curve(outputs.probs, outputs.targets)
        artifacts[f"{name}/roc_curve.png"] = plots.curve_figure(
            fpr,
            tpr,
            xlabel="false positive rate",
            ylabel="true positive rate",
            title=f"{name} ROC (crack)",
            diagonal=True,
        )
    return artifacts


def test_report(val: EvalOutputs, test: EvalOutputs) -> tuple[float, dict[str, float]]:
    """Test metrics at 0.5 (`test/...`) and at the validation-F1-optimal threshold
    (`test/tuned/...`), plus per-surface metrics at the latter."""
    tuned = best_f1_threshold(val.probs, val.targets)
    metrics = split_metrics(test, "test", 0.5)
    metrics.update(split_metrics(test, "test/tuned", tuned))
    metrics.update(per_surface_metrics(test, "test/surface", tuned))
    return tuned, metrics


@torch.no_grad()
def mask_overlay_figure(
    model: torch.nn.Module, examples: dict, threshold: float, title: str, device=None
):
    """Predicted masks of fixed examples (`pipeline.overlay_examples`) over their images,
    next to the ground truth (segdec only); the caller logs the figure."""
    from crackray import plots

    model.eval()
    dec_logit, seg_logit = model(to_model_input(examples["image"], device))
    seg = seg_probabilities(seg_logit, examples["mask"].shape[-2:])
    return plots.mask_overlay_figure(
        examples["image"],
        examples["mask"],
        seg.cpu().numpy(),
        torch.sigmoid(dec_logit.float()).cpu().numpy(),
        threshold,
        title,
    )
