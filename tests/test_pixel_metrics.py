"""Pixel metrics with a distance tolerance, on hand-made masks."""

import numpy as np
import pytest
from scipy import ndimage

from crackray.metrics import pixel_counts, pixel_metrics, sweep_pixel_threshold


def _line(row, shape=(20, 20), cols=slice(3, 17)):
    mask = np.zeros(shape, dtype=bool)
    mask[row, cols] = True
    return mask


@pytest.mark.parametrize("shift", [1, 2])
def test_prediction_within_tolerance_counts_fully(shift):
    gt, pred = _line(8), _line(8 + shift)
    assert pixel_counts(pred, gt, tolerance=2) == (14, 14, 14, 14)
    m = pixel_metrics([pred.astype(float)], [gt], threshold=0.5, tolerance=2)
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0)
    assert m["dice"] == 0.0 and m["iou"] == 0.0  # plain overlap has no tolerance


def test_prediction_beyond_tolerance_counts_nothing():
    gt, pred = _line(8), _line(11)
    assert pixel_counts(pred, gt, tolerance=2) == (0, 14, 0, 14)
    m = pixel_metrics([pred.astype(float)], [gt], threshold=0.5, tolerance=2)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)


def test_tolerance_is_euclidean():
    gt = np.zeros((9, 9), dtype=bool)
    gt[4, 4] = True
    pred = np.zeros_like(gt)
    pred[6, 5] = True  # sqrt(5) = 2.24 away
    assert pixel_counts(pred, gt, tolerance=2)[0] == 0
    assert pixel_counts(pred, gt, tolerance=2.3)[0] == 1


def test_recall_is_against_raw_gt():
    gt = _line(8)
    pred = _line(8, cols=slice(3, 8))  # covers 5 of 14 GT pixels, reaches 2 more
    tp_pred, n_pred, tp_gt, n_gt = pixel_counts(pred, gt, tolerance=2)
    assert (tp_pred, n_pred, n_gt) == (5, 5, 14)
    assert tp_gt == 7


def test_counts_match_brute_force_distances():
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt, pred = rng.random((16, 16)) < 0.1, rng.random((16, 16)) < 0.1
        gt_pts, pred_pts = np.argwhere(gt), np.argwhere(pred)
        d = np.sqrt(((pred_pts[:, None] - gt_pts[None]) ** 2).sum(-1))
        expected = ((d.min(1) <= 2).sum(), len(pred_pts), (d.min(0) <= 2).sum(), len(gt_pts))
        assert pixel_counts(pred, gt, tolerance=2) == tuple(int(x) for x in expected)
        assert ndimage.distance_transform_edt(~gt)[pred].min() == pytest.approx(d.min())


def test_empty_masks():
    empty = np.zeros((10, 10), dtype=bool)
    assert pixel_counts(empty, _line(5, (10, 10), slice(2, 8))) == (0, 0, 0, 6)
    assert pixel_counts(_line(5, (10, 10), slice(2, 8)), empty) == (0, 6, 0, 0)
    m = pixel_metrics([empty.astype(float)], [empty], threshold=0.5)
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["images"] == 1


def test_pooled_and_per_image_f1():
    gt_a, gt_b = _line(8), _line(4)
    pred_a = _line(8).astype(float)  # perfect
    pred_b = np.zeros((20, 20))  # misses everything
    negative = np.zeros((20, 20), dtype=bool)
    m = pixel_metrics([pred_a, pred_b, negative.astype(float)], [gt_a, gt_b, negative], 0.5)
    assert m["precision"] == 1.0 and m["recall"] == 0.5
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["f1_per_image"] == pytest.approx(0.5)  # over the two images with cracks
    assert m["dice"] == pytest.approx(2 * 14 / (14 + 28))
    assert m["iou"] == pytest.approx(14 / 28)


def test_sweep_picks_a_threshold_separating_crack_from_background():
    rng = np.random.default_rng(1)
    gts, preds = [], []
    for row in (5, 9, 13):
        gt = _line(row)
        prob = rng.uniform(0.0, 0.4, gt.shape)  # background
        prob[gt] = rng.uniform(0.6, 0.9, gt.sum())  # cracks
        gts.append(gt)
        preds.append(prob)
    threshold, m = sweep_pixel_threshold(preds, gts, tolerance=0)
    assert 0.4 <= threshold <= 0.6
    assert m["f1"] == 1.0 and m["threshold"] == threshold
    assert pixel_metrics(preds, gts, threshold, tolerance=0) == m
    low = pixel_metrics(preds, gts, 0.1, tolerance=0)
    assert low["recall"] == 1.0 and low["precision"] < 0.5


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes"):
        pixel_counts(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
