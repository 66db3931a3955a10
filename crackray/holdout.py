"""The one look at the test split at the end of a run or tuning job: the best checkpoint's
test metrics (at 0.5 and at the validation-tuned threshold, per surface, and for segmenting
models both pixel protocols at the masks' full resolution) and its confusion matrix and
curves, logged to the run."""

from __future__ import annotations

from pathlib import Path

from crackray import checkpoints
from crackray.data.splits import TEST, VAL
from crackray.evaluation import decision_artifacts, pixel_split_metrics, test_report
from crackray.inference import predict_split
from crackray.models import model_segments
from crackray.tracking import Tracker


def evaluate_on_test(tracker: Tracker, run_id: str, model_file: Path) -> dict[str, float]:
    model, cfg, _ = checkpoints.build_model_from_file(model_file)
    val, test = predict_split(model, cfg, VAL), predict_split(model, cfg, TEST)
    threshold, metrics = test_report(val, test)
    if model_segments(cfg.model.name):
        # Both pixel protocols at their own validation threshold (test/pixel_threshold and
        # test/segdec_threshold record which): the test split never picks its own.
        pixel_threshold, val_pixel = pixel_split_metrics(val, VAL)
        metrics.update(pixel_split_metrics(
            test, TEST, pixel_threshold, segdec_threshold=val_pixel[f"{VAL}/segdec_threshold"])[1])
    tracker.log_metrics(run_id, metrics)
    tracker.log_artifacts(run_id, decision_artifacts(test, threshold, "test"))
    return metrics
