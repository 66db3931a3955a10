"""One threshold-free objective (issue 15): a model whose probabilities are all below 0.5 but
rank every crack above every crack-free tile is the best model for the best checkpoint,
early stopping, ASHA / TPE (their metric) and select, although its F1 at 0.5 is 0."""

from __future__ import annotations

import math

import numpy as np
import pytest

from crackray.config import ExperimentFile, RunConfig, TuneConfig
from crackray.deploy.select import Criterion
from crackray.engine import EvalOutputs
from crackray.errors import ConfigError
from crackray.evaluation import ranking_metrics, split_metrics
from crackray.metrics import average_precision, classification_metrics
from crackray.scores import OBJECTIVE_KEY, objective
from crackray.train.state import TrainingState
from crackray.tune.space import check_search_values

rng = np.random.default_rng(0)
TARGETS = np.array([1] * 30 + [0] * 70)


def outputs(probs) -> EvalOutputs:
    return EvalOutputs(probs=np.asarray(probs, np.float32), targets=TARGETS.copy())


# Perfect ranking, calibration shifted far below 0.5 (e.g. a heavy negative class weight).
SHIFTED = outputs(np.where(TARGETS == 1, 0.30 + 0.1 * rng.random(100), 0.1 * rng.random(100)))
# Calibrated around 0.5, but a third of the cracks rank below some crack-free tiles.
NOISY = outputs(np.clip(np.where(TARGETS == 1, 0.75, 0.25) + rng.normal(0, 0.25, 100), 0, 1))


def epoch_metrics(cfg: RunConfig, val: EvalOutputs) -> dict:
    metrics = {**split_metrics(val, "val"),
               **ranking_metrics(val, "val", cfg.train.objective_min_precision)}
    metrics[OBJECTIVE_KEY] = objective(cfg, metrics, segments=False)
    return metrics


@pytest.mark.parametrize("name", ["ap", "f1_best", "recall_at_precision"])
def test_the_shifted_model_wins_everywhere(name):
    cfg = RunConfig.model_validate({"train": {"objective": name, "objective_min_precision": 0.9}})
    shifted, noisy = epoch_metrics(cfg, SHIFTED), epoch_metrics(cfg, NOISY)
    assert shifted["val/f1"] == 0.0 and noisy["val/f1"] > 0.5  # F1 at 0.5 gets it backwards
    assert shifted[OBJECTIVE_KEY] > noisy[OBJECTIVE_KEY]

    # The best checkpoint and early stopping: the noisy epoch after the shifted one is stale.
    state = TrainingState()
    assert state.record(0, shifted, shifted[OBJECTIVE_KEY], 0.0, patience=1)
    assert not state.record(1, noisy, noisy[OBJECTIVE_KEY], 0.0, patience=1)
    assert state.best_epoch == 0 and state.stopped_early

    # ASHA and TPE read the same logged key, maximised.
    assert (TuneConfig().metric, TuneConfig().mode) == (OBJECTIVE_KEY, "max")

    # select re-thresholds on validation and ranks the shifted model first too.
    criterion = Criterion(min_precision=0.9)
    recall = {}
    for key, val in (("shifted", SHIFTED), ("noisy", NOISY)):
        threshold, _ = criterion.calibrate(val)
        recall[key] = classification_metrics(val.probs, val.targets, threshold)["recall"]
    assert recall["shifted"] == 1.0 > recall["noisy"]


def test_ranking_metrics_against_their_definitions():
    metrics = ranking_metrics(NOISY, "val", 0.8)
    # AP as the mean precision at each crack's rank (no ties in random floats).
    order = np.argsort(-NOISY.probs)
    hits = TARGETS[order]
    precision_at_hit = np.cumsum(hits)[hits == 1] / (np.flatnonzero(hits == 1) + 1)
    assert metrics["val/ap"] == pytest.approx(precision_at_hit.mean(), abs=1e-6)
    assert average_precision(SHIFTED.probs, TARGETS) == pytest.approx(1.0)
    # F1 at the best threshold and recall at the 0.8 precision floor, by brute force.
    best_f1, best_recall = 0.0, 0.0
    for t in np.unique(NOISY.probs):
        pred = NOISY.probs >= t
        tp = int((pred & (TARGETS == 1)).sum())
        precision, recall = tp / pred.sum(), tp / 30
        if tp:
            best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
        if precision >= 0.8:
            best_recall = max(best_recall, recall)
    assert metrics["val/f1_best"] == pytest.approx(best_f1, abs=1e-6)
    assert metrics["val/recall_at_precision"] == pytest.approx(best_recall, abs=1e-6)


def test_one_class_split_has_no_ranking_metrics_and_never_improves():
    one_class = EvalOutputs(probs=np.full(5, 0.9, np.float32), targets=np.ones(5, np.int64))
    assert ranking_metrics(one_class, "val", 0.5) == {}
    cfg = RunConfig()
    score = objective(cfg, {}, segments=False)
    assert math.isnan(score)
    assert not TrainingState().record(0, {}, score, 0.0, patience=3)


def test_the_objective_is_not_searchable_and_tune_metric_is_fixed():
    with pytest.raises(ConfigError, match="search.train.objective"):
        check_search_values(ExperimentFile.model_validate(
            {"search": {"train.objective": {"type": "categorical", "choices": ["ap", "f1_best"]}}}))
    with pytest.raises(ValueError, match="val/objective"):
        TuneConfig.model_validate({"metric": "val/f1"})
