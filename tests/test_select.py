"""`crackray select`: candidates from a real (tiny) tuning job, threshold calibration on
validation, one test pass, a logged + registered model behind an alias, and the errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crackray import select as select_mod
from crackray.deploy.select import Candidate, Criterion, run_selection
from crackray.engine import EvalOutputs
from crackray.errors import CrackrayError
from crackray.metrics import classification_metrics

REPO = Path(__file__).resolve().parents[1]
TINY_TUNE = ["--set", "tune.num_samples=2", "--set", "base.train.epochs=1",
             "--set", "base.data.synthetic_n=80", "--set", "base.data.image_size=32",
             "--set", "tune.scheduler.name=fifo"]  # 1 epoch: nothing for ASHA to cut short


def tune_store(folder: Path, *overrides: str) -> str:
    """Run a 2-trial x 1-epoch tuning job of tiny synthetic tiles in `folder` with the CLI;
    returns the store's tracking URI."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "crackray"), "tune",
         str(REPO / "search_spaces" / "quickstart.yaml"), *TINY_TUNE, *overrides],
        cwd=folder, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return tune_store(tmp_path_factory.mktemp("select"))


# ------------------------------------------------------------------------- pure logic


def _outputs(probs, targets) -> EvalOutputs:
    return EvalOutputs(probs=np.asarray(probs, np.float32), targets=np.asarray(targets))


def test_criterion_calibrates_on_the_precision_floor():
    val = _outputs([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2], [1, 1, 0, 1, 1, 0, 0])
    threshold, best = Criterion(0.75).calibrate(val)
    # At 0.4 four of five predicted cracks are real (0.8 >= 0.75) and recall is 4/4.
    assert threshold == pytest.approx(0.4)
    metrics = classification_metrics(val.probs, val.targets, threshold)
    assert metrics["precision"] == pytest.approx(0.8) and metrics["recall"] == 1.0
    assert best == 1.0
    # Recall >= 0.75: precision 0.75 at 0.6, but 0.8 at 0.4 (recall 1.0) is better.
    assert Criterion(0.0, target_recall=0.75).calibrate(val)[0] == pytest.approx(0.4)
    assert Criterion(0.85, target_recall=0.75).calibrate(val) == (None, pytest.approx(0.8))


def test_criterion_reports_how_close_a_miss_came():
    val = _outputs([0.5] * 6, [1, 0, 0, 1, 0, 0])  # a constant model: precision = 1/3
    threshold, best = Criterion(0.9).calibrate(val)
    assert threshold is None and best == pytest.approx(1 / 3)


def test_ranking_breaks_ties_by_f1_then_auroc():
    def cand(name, recall, f1, auroc):
        return Candidate(name, name, Path("x"), 0.5,
                         {"recall": recall, "f1": f1, "auroc": auroc, "precision": 0.8})

    pool = [cand("a", 0.9, 0.7, 0.9), cand("b", 0.9, 0.8, 0.1), cand("c", 0.9, 0.8, 0.5),
            cand("d", 0.8, 0.99, 0.99), cand("e", 0.9, math.nan, 0.99)]
    ranked = sorted(pool, key=Criterion(0.7).rank_key, reverse=True)
    assert [c.name for c in ranked] == ["c", "b", "a", "e", "d"]


def test_no_finished_trials(tmp_path):
    from crackray.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    parent = tracker.find_or_create_run("exp", "tune/job", run_name="job", kind="tune")
    pruned = tracker.find_or_create_run("exp", "job/t1", run_name="t1", kind="trial",
                                        parent_run_id=parent)
    tracker.set_tags(pruned, {"crackray.trial_status": "pruned"})
    tracker.end_run(pruned, "KILLED")
    with pytest.raises(CrackrayError, match=r"has no finished trials \(t1: pruned\)"):
        run_selection(tracking_uri=uri, experiment="exp", parent_run_id=None,
                      criterion=Criterion(0.7), alias="champion", name="m")
    with pytest.raises(CrackrayError, match="no tuning job in experiment 'other'|no MLflow exp"):
        run_selection(tracking_uri=uri, experiment="other", parent_run_id=None,
                      criterion=Criterion(0.7), alias="champion", name="m")


# ------------------------------------------------------------------------- on a real job


@pytest.mark.slow
def test_no_trial_meets_the_floor_names_the_closest(store, monkeypatch, ray_session):
    # Every trial predicts a constant, so the best reachable precision is the val prevalence.
    real = select_mod.predict_split

    def constant(model, cfg, split):
        out = real(model, cfg, split)
        out.probs = np.full_like(out.probs, 0.5)
        return out

    monkeypatch.setattr(select_mod, "predict_split", constant)
    with pytest.raises(CrackrayError) as info:
        run_selection(tracking_uri=store, experiment=None, parent_run_id=None,
                      criterion=Criterion(0.9), alias="champion", name="crackray-test")
    message = str(info.value)
    assert "no trial meets the criterion (highest val recall at precision >= 0.9)" in message
    assert "closest: trial_driver_" in message and "reaches val precision 0.3" in message


@pytest.mark.slow
def test_select_registers_the_winner_under_the_alias(store, tmp_path, ray_session):
    from crackray.deploy.predict import load_predictor
    from crackray.inference import predict_split
    from crackray.tracking import Tracker

    result = run_selection(tracking_uri=store, experiment="quickstart", parent_run_id=None,
                           criterion=Criterion(0.3), alias="champion", name="crackray-test")
    tracker = Tracker(store)
    version = tracker.client.get_model_version_by_alias("crackray-test", "champion")
    assert str(version.version) == result.version
    assert version.run_id == result.select_run_id

    select_run = tracker.client.get_run(result.select_run_id)
    assert select_run.data.tags["crackray.kind"] == "select"
    assert select_run.data.tags["mlflow.parentRunId"] == result.parent_run_id
    assert select_run.info.status == "FINISHED"
    assert select_run.data.metrics["threshold"] == pytest.approx(result.winner.threshold)
    finished = [c for c in result.candidates if c.eligible]
    assert len(result.candidates) == 2 and result.winner in finished
    assert result.winner.val["recall"] == max(c.val["recall"] for c in finished)

    # The registered model predicts with the calibrated threshold, and its test metrics are
    # those of the winner's checkpoint at that threshold, recomputed here independently.
    predictor = load_predictor("models:/crackray-test@champion", tracking_uri=store)
    assert predictor.threshold == pytest.approx(result.winner.threshold)
    test = predict_split(predictor.model, predictor.cfg, "test")
    expected = classification_metrics(test.probs, test.targets, result.winner.threshold)
    for key in ("tp", "fp", "fn", "tn"):
        assert select_run.data.metrics[f"test/{key}"] == expected[key]
    assert result.test["test/recall"] == pytest.approx(expected["recall"], nan_ok=True)

    artifacts = {a.path for a in tracker.client.list_artifacts(result.select_run_id, "test")}
    assert "test/confusion_matrix.png" in artifacts
    assert "winner" in result.table and result.winner.name in result.reason

    import mlflow
    from mlflow.models import get_model_info

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    info = get_model_info(f"models:/crackray-test/{result.version}")
    assert info.metadata["threshold"] == pytest.approx(result.winner.threshold)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"][0] == -1


@pytest.mark.slow
def test_select_calibrates_the_mask_threshold_of_a_segdec_winner(tmp_path, ray_session):
    """A segmentation winner also gets its pixel threshold chosen on validation (2-px F1);
    the registered model carries it to `predict`'s masks, and test pixel metrics use it."""
    from crackray.deploy.predict import load_predictor
    from crackray.evaluation import pixel_split_metrics
    from crackray.inference import predict_split
    from crackray.tracking import Tracker

    store = tune_store(tmp_path, "--set", "base.model.name=segdec_tiny",
                       "--set", "base.data.synthetic_n=60")
    result = run_selection(tracking_uri=store, experiment="quickstart", parent_run_id=None,
                           criterion=Criterion(0.0), alias="seg", name="crackray-seg")
    winner = result.winner
    assert winner.pixel_threshold is not None and "pixel_f1" in winner.val

    predictor = load_predictor("models:/crackray-seg@seg", tracking_uri=store)
    assert predictor.mask_threshold == pytest.approx(winner.pixel_threshold)
    # Recomputed from the registered model: the threshold is validation's best, and the
    # select run's test pixel metrics are the test split's at that threshold.
    val = predict_split(predictor.model, predictor.cfg, "val")
    assert pixel_split_metrics(val, "val")[0] == pytest.approx(winner.pixel_threshold)
    test = predict_split(predictor.model, predictor.cfg, "test")
    expected = pixel_split_metrics(test, "test", winner.pixel_threshold)[1]
    logged = Tracker(store).client.get_run(result.select_run_id).data.metrics
    assert logged["test/pixel_f1"] == pytest.approx(expected["test/pixel_f1"])
    assert logged["test/pixel_threshold"] == pytest.approx(winner.pixel_threshold)


@pytest.mark.slow
def test_select_cli_errors_exit_2(store, tmp_path, cli):
    done = cli("select", "--min-precision", "0.5", "--parent", "nope", "--tracking-uri", store)
    assert done.returncode == 2 and "error: no MLflow run 'nope'" in done.stderr
    done = cli("select", "--tracking-uri", store)
    assert done.returncode == 2 and "--min-precision" in done.stderr
