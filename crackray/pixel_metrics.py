"""Pixel metrics of segmentation maps with a distance tolerance: crackray's symmetric one and,
to stand beside published tables, the SegDec papers' "2 pixel distance" protocol. numpy /
scipy, vectorised over thresholds; `crackray.metrics` re-exports the public names."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# ---------------------------------------------------------------------------------------------
# Pixel metrics with a distance tolerance
#
# Counts per image, all vectorised over thresholds. A predicted crack pixel is a true positive
# when a ground-truth crack pixel lies within `tolerance` (Euclidean); a ground-truth pixel is
# found when a predicted pixel lies within `tolerance`. Dice and IoU are the plain, tolerance-
# free overlaps, for comparison with papers that report them.

PIXEL_THRESHOLDS = tuple(np.linspace(0.05, 0.95, 19).round(2).tolist())


def _disk(radius: float) -> np.ndarray:
    r = int(np.floor(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    return dy**2 + dx**2 <= radius**2


def _image_counts(prob: np.ndarray, gt: np.ndarray, tolerance: float, thresholds) -> np.ndarray:
    """Counts for one image, shape (len(thresholds), 5); the columns are tp_pred, n_pred,
    tp_gt, n_gt and the plain intersection (pred & gt)."""
    prob, gt = np.asarray(prob, dtype=np.float32), np.asarray(gt, dtype=bool)
    if prob.shape != gt.shape or prob.ndim != 2:
        raise ValueError(f"prediction {prob.shape} and mask {gt.shape} must be equal 2-D shapes")
    # Distance to the nearest crack pixel; with no crack anywhere, nothing is near one.
    near_gt = ndimage.distance_transform_edt(~gt) <= tolerance if gt.any() else np.zeros_like(gt)
    # A GT pixel is found at threshold t iff some pixel within the disk has prob >= t, i.e. iff
    # the disk's maximum probability is >= t: one filter serves every threshold.
    disk_max = ndimage.maximum_filter(
        prob, footprint=_disk(tolerance), mode="constant", cval=-np.inf
    )
    rows = []
    for t in thresholds:
        pred = prob >= t
        rows.append(
            [
                np.count_nonzero(pred & near_gt),
                np.count_nonzero(pred),
                np.count_nonzero(gt & (disk_max >= t)),
                np.count_nonzero(gt),
                np.count_nonzero(pred & gt),
            ]
        )
    return np.asarray(rows, dtype=np.int64)


def pixel_counts(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2) -> tuple[int, ...]:
    """(tp_pred, n_pred, tp_gt, n_gt) for a binary prediction (H, W) against a mask (H, W)."""
    counts = _image_counts(np.asarray(pred, dtype=np.float32), gt, tolerance, [0.5])[0]
    return tuple(int(c) for c in counts[:4])


def _ratio(num, den) -> np.ndarray:
    # 0 where undefined (no predicted / no true pixel), so a threshold sweep can still rank.
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _f1(precision, recall) -> np.ndarray:
    return _ratio(2 * precision * recall, precision + recall)


def _summaries(counts: np.ndarray, thresholds, tolerance: float) -> list[dict]:
    """counts (images, thresholds, 5) -> one metrics dict per threshold."""
    tp_pred, n_pred, tp_gt, n_gt, inter = np.moveaxis(counts.sum(axis=0), -1, 0)
    precision, recall = _ratio(tp_pred, n_pred), _ratio(tp_gt, n_gt)
    f1, dice, iou = (
        _f1(precision, recall),
        _ratio(2 * inter, n_pred + n_gt),
        _ratio(inter, n_pred + n_gt - inter),
    )
    # Per-image F1 is averaged over images that contain a crack: for a crack-free image F1 is
    # undefined (0/0 when nothing is predicted), and such images would swamp the mean.
    per_image = _f1(_ratio(counts[..., 0], counts[..., 1]), _ratio(counts[..., 2], counts[..., 3]))
    has_crack = counts[:, 0, 3] > 0
    f1_per_image = (
        per_image[has_crack].mean(axis=0) if has_crack.any() else np.zeros(len(thresholds))
    )
    return [
        {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "f1_per_image": float(f1_per_image[i]),
            "dice": float(dice[i]),
            "iou": float(iou[i]),
            "threshold": float(t),
            "tolerance": float(tolerance),
            "images": int(counts.shape[0]),
        }
        for i, t in enumerate(thresholds)
    ]


def _all_counts(preds, gts, tolerance, thresholds) -> np.ndarray:
    if len(preds) == 0:
        raise ValueError("need at least one prediction map")
    pairs = zip(preds, gts, strict=True)
    return np.stack([_image_counts(p, g, tolerance, thresholds) for p, g in pairs])


PIXEL_PROTOCOLS = ("symmetric", "segdec")


def _check_protocol(protocol: str) -> None:
    if protocol not in PIXEL_PROTOCOLS:
        raise ValueError(
            f"Invalid pixel protocol {protocol!r}. Only {', '.join(PIXEL_PROTOCOLS)} are supported."
        )


def pixel_metrics(
    preds, gts, threshold: float, tolerance: float = 2, protocol: str = "symmetric"
) -> dict:
    """Pixel metrics of probability maps `preds` against boolean masks `gts` of the same shapes
    (one pair per image).

    protocol="symmetric": pooled precision/recall/F1 with a Euclidean tolerance both ways,
    mean per-image F1, plain Dice and IoU (crack where prob >= threshold).
    protocol="segdec": the SegDec papers' "2 pixel distance" metric, defined below: means over
    images of per-image precision/recall/F1 (crack where prob > threshold; `tolerance` whole px).
    """
    _check_protocol(protocol)
    if protocol == "segdec":
        return _segdec_metrics(preds, gts, threshold, tolerance)
    return _summaries(_all_counts(preds, gts, tolerance, [threshold]), [threshold], tolerance)[0]


def sweep_pixel_threshold(
    preds, gts, tolerance: float = 2, thresholds=None, protocol: str = "symmetric"
) -> tuple[float, dict]:
    """(threshold, metrics) maximising the protocol's F1 (pooled for symmetric, the mean over
    images for segdec); pick it on validation, then apply it to test. `thresholds` defaults to
    the protocol's grid. Ties go to the lowest threshold (higher recall)."""
    _check_protocol(protocol)
    if protocol == "segdec":
        grid = SEGDEC_THRESHOLDS if thresholds is None else thresholds
        return _sweep_segdec_threshold(preds, gts, tolerance, grid)
    grid = PIXEL_THRESHOLDS if thresholds is None else thresholds
    thresholds = [float(t) for t in grid]
    summaries = _summaries(_all_counts(preds, gts, tolerance, thresholds), thresholds, tolerance)
    best = max(range(len(thresholds)), key=lambda i: (summaries[i]["f1"], -thresholds[i]))
    return thresholds[best], summaries[best]


# ---------------------------------------------------------------------------------------------
# The SegDec "2 pixel distance" protocol (Tabernik et al. 2020, Bozic et al. 2021), exactly
#
# Per image, with pred = prob > t (strictly): gt_d = the mask dilated by a (2k+1) cross (no
# diagonal neighbours); tp = |pred & gt_d|, fp = |pred & ~gt_d|, fn = |gt & ~pred| (the raw
# mask: missed pixels get no tolerance). P = tp/(tp+fp), R = tp/(tp+fn), both 0 when tp = 0;
# F1 = 2PR/(P+R), 0 unless both are non-zero. The reported P, R, F1 are means over ALL images,
# a crack-free image counting 0 (as the original code does), so they are not pooled figures.

# (0, 1) in steps of 0.005, the resolution the protocol's threshold is chosen at.
SEGDEC_THRESHOLDS = tuple(np.round(np.arange(1, 200) * 0.005, 3).tolist())


def _cross(tolerance) -> np.ndarray:
    k = int(tolerance)
    if k != tolerance or k < 0:
        raise ValueError(f"segdec tolerance must be a whole number of pixels >= 0, got {tolerance}")
    cross = np.zeros((2 * k + 1, 2 * k + 1), dtype=bool)
    cross[k, :] = cross[:, k] = True
    return cross


def _probability_map(prob) -> np.ndarray:
    # Compared in the map's own float precision, as `prob > t` is with numpy 2: an 8-bit level
    # k/255 stored as float32 that equals a threshold in float32 is "at" it and does not count.
    prob = np.asarray(prob)
    return prob if np.issubdtype(prob.dtype, np.floating) else prob.astype(np.float64)


def _segdec_image_counts(prob, gt, tolerance, thresholds: np.ndarray) -> np.ndarray:
    """(len(thresholds), 3) counts tp, fp, fn of one image; `thresholds` sorted ascending."""
    prob, gt = _probability_map(prob), np.asarray(gt, dtype=bool)
    if prob.shape != gt.shape or prob.ndim != 2:
        raise ValueError(f"prediction {prob.shape} and mask {gt.shape} must be equal 2-D shapes")
    gt_dilated = ndimage.binary_dilation(gt, structure=_cross(tolerance))
    # A pixel's level = how many thresholds lie strictly below its probability = at how many
    # of the (ascending) thresholds it is predicted crack, so one histogram of levels per
    # region, summed from the top, gives the predicted count at every threshold at once.
    levels = np.searchsorted(thresholds.astype(prob.dtype), prob, side="left")
    n = len(thresholds)

    def predicted(region: np.ndarray) -> np.ndarray:
        histogram = np.bincount(levels[region], minlength=n + 1)
        return np.cumsum(histogram[::-1])[::-1][1:]

    tp, fp = predicted(gt_dilated), predicted(~gt_dilated)
    fn = np.count_nonzero(gt) - predicted(gt)
    return np.stack([tp, fp, fn], axis=-1)


def _segdec_summaries(preds, gts, tolerance, thresholds) -> list[dict]:
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1 or np.any(np.diff(thresholds) <= 0):
        raise ValueError("segdec thresholds must be a strictly increasing sequence")
    if len(preds) == 0:
        raise ValueError("need at least one prediction map")
    counts = np.stack(
        [_segdec_image_counts(p, g, tolerance, thresholds) for p, g in zip(preds, gts, strict=True)]
    )
    tp, fp, fn = np.moveaxis(counts, -1, 0)  # each (images, thresholds)
    # _ratio is 0 for 0/0, and tp = 0 makes both ratios 0: the protocol's "else 0" cases.
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _f1(precision, recall)
    crack_images = sum(bool(np.any(g)) for g in gts)
    return [
        {
            "precision": float(precision[:, i].mean()),
            "recall": float(recall[:, i].mean()),
            "f1": float(f1[:, i].mean()),
            "threshold": float(t),
            "tolerance": float(tolerance),
            "images": int(counts.shape[0]),
            "crack_images": int(crack_images),
        }
        for i, t in enumerate(thresholds)
    ]


def _segdec_metrics(preds, gts, threshold: float, tolerance: int = 2) -> dict:
    """The SegDec protocol (above) at `threshold`: mean precision, recall, F1 over the images."""
    return _segdec_summaries(preds, gts, tolerance, [threshold])[0]


def _sweep_segdec_threshold(
    preds, gts, tolerance: int = 2, thresholds=SEGDEC_THRESHOLDS
) -> tuple[float, dict]:
    """(threshold, metrics) maximising the SegDec protocol's mean F1; ties go to the lowest
    threshold. Every threshold is scored in one pass over each image."""
    thresholds = sorted(float(t) for t in thresholds)
    summaries = _segdec_summaries(preds, gts, tolerance, thresholds)
    best = max(range(len(thresholds)), key=lambda i: (summaries[i]["f1"], -thresholds[i]))
    return thresholds[best], summaries[best]
