"""`crackray select`: candidates from a real (tiny) tuning job or one training run, threshold
calibration on validation, one test pass with photo-grouped bootstrap intervals, a logged +
registered model behind an alias, and the errors (unfinished jobs refused)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from crackray.deploy import select as select_mod
from crackray.deploy.intervals import METRICS, photo_bootstrap
from crackray.deploy.select import Candidate, Criterion, run_selection
from crackray.engine import EvalOutputs
from crackray.errors import CrackrayError
from crackray.metrics import best_f1_threshold, classification_metrics
from tests.conftest import REPO, run_tiny_tune


@pytest.fixture(scope="module")
def store(tiny_tune_job, tmp_path_factory) -> str:
    return tiny_tune_job.copy(tmp_path_factory.mktemp("select")).uri


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


def test_criterion_by_f1_takes_the_validation_best_f1_threshold():
    rng = np.random.default_rng(5)
    targets = rng.integers(0, 2, 200)
    val = _outputs(np.clip(0.35 * targets + 0.65 * rng.random(200), 0, 1), targets)
    threshold, best = Criterion(0.0, by="f1").calibrate(val)
    assert threshold == pytest.approx(best_f1_threshold(val.probs, val.targets))
    assert best == pytest.approx(classification_metrics(val.probs, val.targets, threshold)["f1"])
    # With a floor: the best F1 among thresholds whose precision reaches it, by brute force.
    floor = 0.8
    feasible = [(classification_metrics(val.probs, val.targets, t)["f1"], t)
                for t in np.unique(val.probs)
                if classification_metrics(val.probs, val.targets, t)["precision"] >= floor]
    threshold, best = Criterion(floor, by="f1").calibrate(val)
    assert best == pytest.approx(max(feasible)[0], abs=1e-6)
    assert classification_metrics(val.probs, val.targets, threshold)["precision"] >= floor


def test_bootstrap_intervals_match_a_direct_photo_resampling():
    rng = np.random.default_rng(3)
    photos = np.repeat([f"photo-{i:02d}" for i in range(15)], rng.integers(1, 7, 15))
    targets = rng.integers(0, 2, len(photos))
    probs = np.clip(0.3 * targets + 0.7 * rng.random(len(photos)), 0, 1)
    got = photo_bootstrap(probs, targets, photos, 0.5, resamples=400, seed=11)

    # Directly: draw photo ids with replacement, keep every tile of each drawn photo, score the
    # resample with torchmetrics; a metric with a zero denominator is left out.
    draw, ids = np.random.default_rng(11), np.unique(photos)
    values = {name: [] for name in METRICS}
    for _ in range(400):
        chosen = ids[draw.integers(0, len(ids), len(ids))]
        rows = np.concatenate([np.flatnonzero(photos == photo) for photo in chosen])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = classification_metrics(probs[rows], targets[rows], 0.5)
        for name, denominator in (("precision", m["tp"] + m["fp"]),
                                  ("recall", m["tp"] + m["fn"]),
                                  ("f1", m["tp"] + m["fp"] + m["fn"])):
            if denominator:
                values[name].append(m[name])
    for name in METRICS:
        low, high = np.percentile(values[name], [2.5, 97.5])
        assert got[name] == pytest.approx((low, high), abs=1e-6), name
    # Grouping matters: resampling the same tiles one by one gives a narrower F1 interval.
    tiles = photo_bootstrap(probs, targets, np.arange(len(photos)).astype(str), 0.5,
                            resamples=400, seed=11)
    assert tiles["f1"][1] - tiles["f1"][0] < got["f1"][1] - got["f1"][0]


def test_a_test_precision_below_the_floor_is_warned_about():
    assert select_mod._alerts({"test/precision": 0.61}, Criterion(0.7)) == [
        "warning: test precision 0.6100 is below the floor 0.7 the threshold was calibrated "
        "to on validation"]
    assert select_mod._alerts({"test/precision": 0.71}, Criterion(0.7)) == []
    assert select_mod._alerts({"test/precision": 0.2}, Criterion(0.0, by="f1")) == []


def _job_with_a_pruned_trial(uri: str) -> str:
    from crackray.tracking import Tracker

    tracker = Tracker(uri)
    parent = tracker.find_or_create_run("exp", "tune/job", run_name="job", kind="tune")
    pruned = tracker.find_or_create_run("exp", "job/t1", run_name="t1", kind="trial",
                                        parent_run_id=parent)
    tracker.set_tags(pruned, {"crackray.trial_status": "pruned"})
    tracker.end_run(pruned, "KILLED")
    return parent


def test_unfinished_jobs_are_refused(tmp_path):
    from crackray.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = _job_with_a_pruned_trial(uri)
    select = dict(tracking_uri=uri, experiment="exp", parent_run_id=None,
                  criterion=Criterion(0.7), alias="champion", name="m")
    with pytest.raises(CrackrayError, match=rf"^tuning job job \({parent}\) is still RUNNING: "):
        run_selection(**select)
    Tracker(uri).end_run(parent, "KILLED")
    with pytest.raises(CrackrayError, match=r"ended KILLED: .*--allow-unfinished"):
        run_selection(**select)
    # Accepted, it selects from what the job finished: here nothing.
    with pytest.raises(CrackrayError, match=r"has no finished trials \(t1: pruned\)"):
        run_selection(**select, allow_unfinished=True)


def test_no_finished_trials(tmp_path):
    from crackray.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri).end_run(_job_with_a_pruned_trial(uri), "FINISHED")
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
    # Threshold-free AP beside them, the scores a paper's table gives, overall and per surface.
    logged = select_run.data.metrics
    assert logged["test/ap"] == pytest.approx(
        skm.average_precision_score(test.targets, test.probs), abs=1e-6)
    for surface in sorted(set(test.surfaces.tolist())):
        keep = test.surfaces == surface
        assert logged[f"test/surface/{surface}/f1"] == pytest.approx(classification_metrics(
            test.probs[keep], test.targets[keep], result.winner.threshold)["f1"])
        if 0 < test.targets[keep].sum() < keep.sum():
            assert logged[f"test/surface/{surface}/ap"] == pytest.approx(
                skm.average_precision_score(test.targets[keep], test.probs[keep]), abs=1e-6)
    assert "val/ap" in logged and any(key.startswith("val/surface/") for key in logged)

    artifacts = {a.path for a in tracker.client.list_artifacts(result.select_run_id, "test")}
    assert "test/confusion_matrix.png" in artifacts
    assert "winner" in result.table and result.winner.name in result.reason

    import mlflow
    from mlflow.models import get_model_info

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    info = get_model_info(f"models:/crackray-test/{result.version}")
    assert info.metadata["threshold"] == pytest.approx(result.winner.threshold)
    signature = info.signature.inputs.to_dict()
    assert signature == [{"type": "string", "name": "image", "required": True}]


@pytest.mark.slow
def test_select_calibrates_the_mask_threshold_of_a_segdec_winner(tmp_path, ray_session):
    """A segmentation winner also gets its pixel threshold chosen on validation (2-px F1);
    the registered model carries it to `predict`'s masks, and test pixel metrics use it."""
    from crackray.deploy.predict import load_predictor
    from crackray.evaluation import pixel_split_metrics
    from crackray.inference import predict_split
    from crackray.tracking import Tracker

    store = run_tiny_tune(tmp_path, "--set", "base.model.name=segdec_tiny",
                       "--set", "base.data.synthetic_n=60", "--set", "tune.num_samples=1").uri
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


@pytest.mark.slow
def test_select_run_calibrates_one_training_run_by_f1(tmp_path, cli):
    """`crackray train`, then `select --run RUN --by f1`: the registered model's threshold is
    the validation-best-F1 threshold of the run's best checkpoint, recomputed here from the
    registered weights; the test pass comes with photo-grouped bootstrap intervals."""
    from crackray.deploy.predict import load_predictor
    from crackray.inference import predict_split
    from crackray.tracking import Tracker

    temp = tmp_path / "tmp"  # the commands' temp dir: what they download must not stay
    temp.mkdir()
    done = cli("train", REPO / "search_spaces" / "quickstart.yaml", "--set", "train.epochs=1",
               "--set", "data.synthetic_n=80", "--set", "data.image_size=32", timeout=1500,
               env={"TMPDIR": str(temp)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = Tracker(store).latest_run_anywhere("train")
    done = cli("select", "--run", run.info.run_id, "--by", "f1", "--alias", "champion",
               "--name", "crackray-run", env={"TMPDIR": str(temp)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in temp.glob("crackray-*")) == []  # crackray/scratch.py
    assert "highest val F1" in done.stdout
    assert "test 95 % intervals (photo bootstrap)" in done.stdout

    predictor = load_predictor("models:/crackray-run@champion", tracking_uri=store)
    val = predict_split(predictor.model, predictor.cfg, "val")
    assert predictor.threshold == pytest.approx(best_f1_threshold(val.probs, val.targets))

    tracker = Tracker(store)
    version = tracker.client.get_model_version_by_alias("crackray-run", "champion")
    assert version.tags["source_run_id"] == run.info.run_id
    assert version.tags["source_model_id"] == tracker.best_model_id(run.info.run_id)
    select_run = tracker.client.get_run(version.run_id)
    assert select_run.data.tags["mlflow.parentRunId"] == run.info.run_id
    metrics = select_run.data.metrics
    test = predict_split(predictor.model, predictor.cfg, "test")
    expected = classification_metrics(test.probs, test.targets, predictor.threshold)
    assert metrics["test/tp"] == expected["tp"] and metrics["test/fp"] == expected["fp"]
    bootstrap = json.loads((tracker.download(select_run.info.run_id, "test/bootstrap.json"))
                           .read_text())
    photos = select_mod.photo_ids_of(predictor.cfg.data.path, test)
    again = photo_bootstrap(test.probs, test.targets, photos, predictor.threshold,
                            resamples=select_mod.BOOTSTRAP_RESAMPLES)
    for name in METRICS:
        assert bootstrap["intervals"][name] == pytest.approx(list(again[name]), nan_ok=True)
        assert metrics[f"test/{name}_ci95_low"] == pytest.approx(again[name][0], nan_ok=True)
    assert bootstrap["photos"] == len(set(photos))
