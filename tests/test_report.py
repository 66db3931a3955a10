"""`crackray report`: the results page of a tuning job and of its best trial, with numbers
checked against the manifest and an independent recomputation, logged to MLflow."""

from __future__ import annotations

import re

import pytest
from test_select import tune_store

from crackray import checkpoints
from crackray.data.shards import read_manifest
from crackray.metrics import best_f1_threshold, classification_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return tune_store(tmp_path_factory.mktemp("report"))


def _table_rows(markdown: str, section: str, first_cell: str) -> list[str]:
    """Rows starting with `first_cell` of the tables under `## section`."""
    text = markdown.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("|")]
    return [row for row in rows if row[0].strip() == first_cell]


def test_report_of_a_tuning_job(store, tmp_path, ray_session):
    from crackray.inference import predict_split
    from crackray.report import build_report
    from crackray.tracking import Tracker

    tracker = Tracker(store)
    parent = tracker.latest_run_anywhere("tune")
    out = tmp_path / "report"
    page = build_report(parent.info.run_id, out, tracking_uri=store).read_text()
    trials = tracker.child_runs(parent.info.run_id, kind="trial")
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.run_id in page
    assert "optim.lr" in page  # a searched parameter is a column of the trials table

    best_id = parent.data.tags["crackray.best_run_id"]
    best = (out / "best_trial" / "report.md").read_text()
    assert best_id in best

    # Dataset table == manifest.
    best_run = tracker.get_run(best_id)
    manifest = read_manifest(best_run.data.params["data.path"])
    for split, totals in manifest["totals"].items():
        [row] = _table_rows(best, "Dataset", split)
        assert [int(v) for v in row[1:4]] == [totals["samples"], totals["crack"],
                                               totals["no_crack"]]

    # Decision table == an independent pass of the best checkpoint at the val-F1 threshold.
    model_file = tracker.download(best_id, f"checkpoints/{checkpoints.BEST_FILE}")
    model, cfg, _ = checkpoints.build_model_from_file(model_file)
    val, test = predict_split(model, cfg, "val"), predict_split(model, cfg, "test")
    threshold = best_f1_threshold(val.probs, val.targets)
    expected = classification_metrics(test.probs, test.targets, threshold)
    [row] = _table_rows(best, "Decision", "test")
    assert float(row[6]) == pytest.approx(threshold, abs=1e-4)
    assert [int(v) for v in row[7:11]] == [expected[k] for k in ("tp", "fp", "fn", "tn")]

    for name in ("confusion_matrix.png", "pr_curve.png", "roc_curve.png", "loss_curves.png",
                 "score_curves.png"):
        assert (out / "best_trial" / name).stat().st_size > 1000, name
        assert f"]({name})" in best
    for image in re.findall(r"\]\((gallery/[^)]+\.png)\)", best):
        assert (out / "best_trial" / image).exists()
    for kind in ("fn", "fp"):  # the worst mistakes, up to 8 of each
        shown = set(re.findall(rf"gallery/{kind}_\d+\.png", best))
        assert len(shown) == min(expected[kind], 8), kind
    assert "## Run parameters" in best and "| model.name | simple_cnn |" in best

    logged = {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in logged and "report/best_trial" in logged


def test_report_of_unknown_run_is_a_clear_error(store, tmp_path, cli):
    done = cli("report", "0123abc", "--out", tmp_path / "r", "--tracking-uri", store)
    assert done.returncode == 2 and "error: no MLflow run '0123abc'" in done.stderr
