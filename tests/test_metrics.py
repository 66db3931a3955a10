"""Tile metrics against scikit-learn; crack (1) is the positive class."""

import math

import numpy as np
import pytest
from sklearn import metrics as sk

from crackray.metrics import (
    best_f1_threshold,
    classification_metrics,
    confusion_matrix,
    pr_curve,
    roc_curve,
    threshold_for_min_precision,
    threshold_for_min_recall,
)


def _data(seed, n=300):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, n)
    # Informative but noisy scores, rounded so that ties occur.
    probs = np.clip(0.35 * targets + rng.uniform(0, 0.65, n), 0, 1).round(2).astype(np.float32)
    return probs, targets


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
@pytest.mark.parametrize("seed", [0, 1])
def test_classification_metrics_match_sklearn(seed, threshold):
    probs, targets = _data(seed)
    m = classification_metrics(probs, targets, threshold)
    preds = (probs >= threshold).astype(int)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(targets, preds), abs=1e-6)
    assert m["precision"] == pytest.approx(sk.precision_score(targets, preds), abs=1e-6)
    assert m["recall"] == pytest.approx(sk.recall_score(targets, preds), abs=1e-6)
    assert m["f1"] == pytest.approx(sk.f1_score(targets, preds), abs=1e-6)
    assert m["auroc"] == pytest.approx(sk.roc_auc_score(targets, probs), abs=1e-6)
    cm = sk.confusion_matrix(targets, preds, labels=[0, 1])
    assert confusion_matrix(probs, targets, threshold) == cm.tolist()
    assert [[m["tn"], m["fp"]], [m["fn"], m["tp"]]] == cm.tolist()
    assert (m["samples"], m["positives"]) == (len(targets), targets.sum())
    assert m["negatives"] == len(targets) - targets.sum()
    assert m["threshold"] == threshold


def test_prediction_at_exact_threshold_is_crack():
    m = classification_metrics([0.5, 0.2], [1, 0], threshold=0.5)
    assert (m["tp"], m["tn"]) == (1, 1)


def test_confusion_matrix_layout():
    # rows: true [no_crack, crack]; columns: predicted [no_crack, crack]
    probs = [0.9, 0.8, 0.1, 0.7, 0.2, 0.3]
    targets = [1, 1, 1, 0, 0, 0]
    assert confusion_matrix(probs, targets, 0.5) == [[2, 1], [1, 2]]


def test_no_negatives_warns_and_gives_nan():
    with pytest.warns(UserWarning, match="no negative"):
        m = classification_metrics([0.9, 0.8, 0.3], [1, 1, 1])
    assert math.isnan(m["precision"]) and math.isnan(m["auroc"])
    assert m["recall"] == pytest.approx(2 / 3)


def test_no_positives_warns_and_gives_nan():
    with pytest.warns(UserWarning, match="no positive"):
        m = classification_metrics([0.9, 0.2, 0.3], [0, 0, 0])
    assert math.isnan(m["recall"]) and math.isnan(m["auroc"])
    assert m["precision"] == 0.0


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="lengths"):
        classification_metrics([0.1, 0.2], [1])


def _sklearn_f1s(probs, targets):
    precision, recall, thresholds = sk.precision_recall_curve(targets, probs)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return f1, thresholds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_f1_threshold_reaches_sklearn_max(seed):
    probs, targets = _data(seed)
    t = best_f1_threshold(probs, targets)
    f1, _ = _sklearn_f1s(probs, targets)
    assert sk.f1_score(targets, probs >= t) == pytest.approx(f1.max(), abs=1e-6)


@pytest.mark.parametrize("floor", [0.6, 0.8, 0.95])
def test_threshold_for_min_precision(floor):
    probs, targets = _data(3)
    t, recall, precision = threshold_for_min_precision(probs, targets, floor)
    preds = probs >= t
    assert precision == pytest.approx(sk.precision_score(targets, preds), abs=1e-6)
    assert recall == pytest.approx(sk.recall_score(targets, preds), abs=1e-6)
    assert precision >= floor
    p, r, _ = sk.precision_recall_curve(targets, probs)
    assert recall == pytest.approx(r[p >= floor].max(), abs=1e-6)


@pytest.mark.parametrize("floor", [0.5, 0.9, 1.0])
def test_threshold_for_min_recall(floor):
    probs, targets = _data(4)
    t, precision, recall = threshold_for_min_recall(probs, targets, floor)
    preds = probs >= t
    assert precision == pytest.approx(sk.precision_score(targets, preds), abs=1e-6)
    assert recall == pytest.approx(sk.recall_score(targets, preds), abs=1e-6)
    assert recall >= floor
    p, r, _ = sk.precision_recall_curve(targets, probs)
    assert precision == pytest.approx(p[r >= floor].max(), abs=1e-6)


def test_unreachable_floor_gives_none():
    probs, targets = np.array([0.9, 0.8, 0.1]), np.array([0, 0, 1])
    assert threshold_for_min_precision(probs, targets, 0.5) is None
    assert threshold_for_min_recall(probs, targets, 1.0) is not None


def test_curves_match_sklearn():
    probs, targets = _data(5)
    precision, recall, thresholds = pr_curve(probs, targets)
    assert len(precision) == len(recall) == len(thresholds) + 1
    assert (precision[-1], recall[-1]) == (1.0, 0.0)
    fpr, tpr, _ = roc_curve(probs, targets)
    assert isinstance(fpr, np.ndarray)
    assert np.trapezoid(tpr, fpr) == pytest.approx(sk.roc_auc_score(targets, probs), abs=1e-6)
    sk_p, sk_r, _ = sk.precision_recall_curve(targets, probs)
    assert sk.auc(recall, precision) == pytest.approx(sk.auc(sk_r, sk_p), abs=1e-6)
