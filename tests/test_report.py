"""`crackray report`: the results page of a tuning job and of its best trial, with numbers
checked against the manifest and an independent recomputation, logged to MLflow."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from crackray import checkpoints
from crackray.data.shards import read_manifest
from crackray.metrics import best_f1_threshold, classification_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tiny_tune_job, tmp_path_factory) -> str:
    return tiny_tune_job.copy(tmp_path_factory.mktemp("report")).uri  # the report is logged


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


def test_report_and_the_test_pass_import_no_ray():
    code = ("import sys, crackray.report, crackray.holdout, crackray.inference; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'"
            " or m.startswith(('crackray.train', 'crackray.tune'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_report_of_unknown_run_is_a_clear_error(store, tmp_path, cli):
    done = cli("report", "0123abc", "--out", tmp_path / "r", "--tracking-uri", store)
    assert done.returncode == 2 and "error: no MLflow run '0123abc'" in done.stderr


# ------------------------------------------------------------------------- segdec run page

SEGDEC_SECTIONS = ["## Dataset", "## Run parameters", "### Decision", "### 2 pixel distance",
                   "## Losses", "## Scores"]  # the seed results page's order


def _segdec_run(tmp_path):
    """A segdec model file logged as a run's best checkpoint, two epochs of curves, and the
    run's test pass (`holdout.evaluate_on_test`), without training: the page is what is
    tested, and an untrained model predicts maps as a trained one does."""
    import torch
    from test_pixel_metrics import TRAIN_SIZE, thin_crack_config, thin_crack_dataset

    from crackray.holdout import evaluate_on_test
    from crackray.models import create_model
    from crackray.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = thin_crack_config(thin_crack_dataset(tmp_path), **{"tracking.uri": uri})
    torch.manual_seed(1)
    model_file = checkpoints.save_model_file(
        tmp_path / checkpoints.BEST_FILE, create_model("segdec_tiny", image_size=TRAIN_SIZE)
        .state_dict(), cfg)
    tracker = Tracker(uri)
    run_id = tracker.find_or_create_run("segdec-report", "segdec-report", run_name="segdec",
                                        kind="train")
    for epoch, loss in enumerate((0.9, 0.6)):
        tracker.log_metrics(run_id, {"train/loss": loss, "train/dec": loss / 2,
                                     "train/seg": loss / 3, "val/loss": loss + 0.1,
                                     "val/objective": 1 - loss, "val/segdec_f1": 1 - loss},
                            step=epoch)
    tracker.log_artifact(run_id, model_file, "checkpoints")
    logged = evaluate_on_test(tracker, run_id, model_file)
    tracker.flush(raise_errors=True, timeout_s=60)
    return tracker, run_id, cfg, logged


def _rows(markdown: str, section: str) -> list[list[str]]:
    """The cells of every table row (header and separator excluded) under `section`."""
    text = markdown.split(f"\n{section}\n", 1)[1].split("\n#", 1)[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("|")]
    return [row for row in rows if not set(row[0]) <= {"-"}]


def test_report_of_a_segdec_run_is_the_seed_results_page(tmp_path):
    from crackray.report import build_report

    tracker, run_id, cfg, logged = _segdec_run(tmp_path)
    out = tmp_path / "report"
    page = build_report(run_id, out, tracking_uri=tracker.uri).read_text()
    positions = [page.index(f"\n{section}\n") for section in SEGDEC_SECTIONS]
    assert positions == sorted(positions)
    assert "## Per surface" not in page  # the classification page's own layout stays apart

    # Dataset: the input's shape and samples, and positives / negatives / sum per set.
    manifest = read_manifest(cfg.data.path)["totals"]
    dataset = dict(row for row in _rows(page, "## Dataset") if len(row) == 2)
    assert dataset["Input channels"] == "3"
    assert dataset["Input height"] == dataset["Input width"] == str(cfg.data.image_size)
    sets = {row[0]: [int(v) for v in row[1:]] for row in _rows(page, "## Dataset")
            if len(row) == 4 and row[0] != "Set"}
    for label, split in (("Train", "train"), ("Test", "test"), ("Validation", "val")):
        totals = manifest[split]
        assert dataset[f"{label} samples"] == str(totals["samples"])
        assert sets[label] == [totals["crack"], totals["no_crack"], totals["samples"]]
    assert sets["**Sum**"] == [sum(v[i] for k, v in sets.items() if k != "**Sum**")
                               for i in range(3)]

    parameters = dict(_rows(page, "## Run parameters")[1:])
    for name, value in (("Epochs", cfg.train.epochs), ("Learning rate", cfg.optim.lr),
                        ("Delta CLS Loss", cfg.loss.delta_cls), ("Dilate", cfg.data.dilate),
                        ("Dynamically balanced loss", cfg.loss.dynamic_balance),
                        ("Gradient-flow adjustment", cfg.train.gradient_adjustment),
                        ("Frequency-of-use sampling", cfg.data.frequency_sampling),
                        ("Weighted segmentation loss", cfg.loss.weighted_seg),
                        ("Best model type", cfg.train.best_model),
                        ("Use negatives", cfg.data.use_negatives),
                        ("Augmentation", cfg.data.augment), ("Optimizer", cfg.optim.name)):
        cell = parameters[name]
        assert (float(cell) == pytest.approx(value) if isinstance(value, float)
                else cell == str(value)), name
    assert parameters["Batch size"].startswith(f"{cfg.train.batch_size} per worker")

    # Decision == the run's test pass at the validation-F1 threshold (test/tuned/...).
    [header, decision] = _rows(page, "### Decision")
    assert header == ["Precision", "Recall", "F1", "Accuracy", "Threshold", "TP", "FP", "FN",
                      "TN"]
    for cell, key in zip(decision, ("precision", "recall", "f1", "accuracy", "threshold"),
                         strict=False):
        assert float(cell) == pytest.approx(logged[f"test/tuned/{key}"], abs=1e-5), key
    assert [int(v) for v in decision[5:]] == [logged[f"test/tuned/{k}"]
                                              for k in ("tp", "fp", "fn", "tn")]

    # 2 pixel distance == the SegDec-protocol test metrics the run logged, at val's threshold.
    run = tracker.get_run(run_id)
    [header, pixel] = _rows(page, "### 2 pixel distance")
    assert header == ["Precision", "Recall", "F1", "Threshold"]
    keys = ("precision", "recall", "f1", "threshold")
    assert [float(v) for v in pixel] == pytest.approx(
        [run.data.metrics[f"test/segdec_{k}"] for k in keys], abs=1e-5)
    assert "test/pixel_f1" in run.data.metrics and "test/pixel_threshold" in run.data.metrics

    for image in ("loss.png", "loss_dec.png", "loss_seg.png", "loss_val.png", "scores.png"):
        assert (out / image).stat().st_size > 1000, image
        assert f"](./{image})" in page
