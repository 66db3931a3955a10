"""`crackray select`: pick the deployment model of a tuning job (or take one training run),
calibrate its threshold on validation, test it once, log it with MLflow and point a registry
alias at it.

Selection happens on validation only: each finished trial's best checkpoint predicts the
validation split, a threshold is calibrated there (the precision floor, the recall target, or
the best F1), and the winner is the trial with the best calibrated recall (precision, F1). The
test split is looked at once, for the winner, at the threshold chosen on validation; its
precision, recall and F1 come with photo-grouped bootstrap intervals, and a test precision
below the floor the model was selected at is warned about.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crackray import checkpoints
from crackray.data.shards import read_split_table
from crackray.data.splits import TEST, VAL
from crackray.deploy.intervals import photo_bootstrap
from crackray.deploy.predict import MODEL_FILE
from crackray.deploy.sources import find_source
from crackray.engine import EvalOutputs
from crackray.errors import CrackrayError
from crackray.evaluation import (
    decision_artifacts,
    per_surface_metrics,
    pixel_split_metrics,
    split_metrics,
)
from crackray.inference import predict_split
from crackray.metrics import (
    average_precision,
    classification_metrics,
    pr_curve,
    threshold_for_min_precision,
    threshold_for_min_recall,
)
from crackray.scratch import scratch_folder
from crackray.tracking import Tracker

BOOTSTRAP_RESAMPLES = 2000


@dataclass
class Candidate:
    run_id: str
    name: str
    model_file: Path
    threshold: float | None = None
    val: dict = field(default_factory=dict)  # validation metrics at `threshold`
    closest: float = math.nan  # the best value of the constrained metric this trial reaches
    # Segmentation models: the pixel threshold of their masks, swept on validation for the
    # 2-px F1 of the experiment's train.pixel_protocol.
    pixel_threshold: float | None = None

    @property
    def eligible(self) -> bool:
        return self.threshold is not None


@dataclass
class Selection:
    parent_run_id: str
    select_run_id: str
    winner: Candidate
    candidates: list[Candidate]
    test: dict
    model_uri: str
    version: str
    table: str
    reason: str
    intervals: dict = field(default_factory=dict)  # test metric -> 95 % (low, high)
    alerts: list[str] = field(default_factory=list)  # what the user must not miss


@dataclass(frozen=True)
class Criterion:
    """--by recall (highest recall at a precision floor), --by f1 (highest F1, at the floor
    if one is given) or --target-recall (best precision above it)."""

    min_precision: float
    target_recall: float | None = None
    by: str = "recall"

    @property
    def objective(self) -> str:
        if self.by == "f1":
            return "f1"
        return "recall" if self.target_recall is None else "precision"

    def describe(self) -> str:
        floor = f" and precision >= {self.min_precision:g}" if self.min_precision > 0 else ""
        if self.by == "f1":
            return f"highest val F1{floor.replace(' and', ' at')}"
        if self.target_recall is None:
            return f"highest val recall at precision >= {self.min_precision:g}"
        return f"highest val precision at recall >= {self.target_recall:g}{floor}"

    def calibrate(self, val: EvalOutputs) -> tuple[float | None, float]:
        """(threshold or None, the best value the constrained metric reaches)."""
        precision, recall, thresholds = pr_curve(val.probs, val.targets)
        # The curve's last point (precision 1, recall 0) has no threshold: not reachable.
        precision, recall = precision[:-1], recall[:-1]
        if self.by == "f1":
            ok = np.flatnonzero(precision >= self.min_precision)
            if ok.size == 0:
                return None, float(np.max(precision))
            total = precision[ok] + recall[ok]
            f1 = np.divide(2 * precision[ok] * recall[ok], total, out=np.zeros_like(total),
                           where=total > 0)
            best = ok[int(np.argmax(f1))]
            return float(thresholds[best]), float(np.max(f1))
        if self.target_recall is None:
            found = threshold_for_min_precision(val.probs, val.targets, self.min_precision)
            return (found[0] if found else None), float(np.max(precision))
        found = threshold_for_min_recall(val.probs, val.targets, self.target_recall)
        if found is None:
            return None, float(np.max(recall))
        threshold, best_precision, _ = found
        if best_precision < self.min_precision:
            return None, best_precision
        return threshold, best_precision

    def rank_key(self, candidate: Candidate) -> tuple[float, float, float]:
        """Higher is better; ties broken by F1, then AUROC (NaN ranks last)."""
        def value(key):
            v = candidate.val.get(key, math.nan)
            return -math.inf if math.isnan(v) else v

        return value(self.objective), value("f1"), value("auroc")


def evaluate_candidate(tracker: Tracker, run, criterion: Criterion) -> Candidate:
    """Predict validation with the trial's best checkpoint and calibrate its threshold."""
    model_file = tracker.download(run.info.run_id, f"checkpoints/{checkpoints.BEST_FILE}")
    candidate = Candidate(run.info.run_id, run.info.run_name, model_file)
    model, cfg, _ = checkpoints.build_model_from_file(model_file)
    val = predict_split(model, cfg, VAL)
    candidate.threshold, candidate.closest = criterion.calibrate(val)
    if candidate.eligible:
        candidate.val = classification_metrics(val.probs, val.targets, candidate.threshold)
        candidate.val["ap"] = average_precision(val.probs, val.targets)
        candidate.val.update(per_surface_metrics(val, "surface", candidate.threshold))
        if val.seg_probs:
            _, pixel = pixel_split_metrics(val, VAL)
            candidate.val.update({k.removeprefix(f"{VAL}/"): v for k, v in pixel.items()})
            protocol = "pixel" if cfg.train.pixel_protocol == "symmetric" else "segdec"
            candidate.pixel_threshold = pixel[f"{VAL}/{protocol}_threshold"]
    return candidate


def run_selection(*, tracking_uri: str | None, experiment: str | None, parent_run_id: str | None,
                  criterion: Criterion, alias: str, name: str, run_id: str | None = None,
                  allow_unfinished: bool = False) -> Selection:
    """Select from the tuning job `parent_run_id` (default: the newest of `experiment`), or
    calibrate and register the single training run `run_id`."""
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    source = find_source(tracker, experiment=experiment, parent_run_id=parent_run_id,
                         run_id=run_id, allow_unfinished=allow_unfinished)
    parent = source.run
    candidates = [evaluate_candidate(tracker, run, criterion) for run in source.candidates]
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        closest = max(candidates, key=lambda c: -math.inf if math.isnan(c.closest) else c.closest)
        metric = "precision" if criterion.target_recall is None else (
            "recall" if closest.closest < criterion.target_recall else "precision")
        raise CrackrayError(
            f"no trial meets the criterion ({criterion.describe()}); closest: "
            f"{closest.name} ({closest.run_id}) reaches val {metric} {closest.closest:.3f}")
    ranked = sorted(eligible, key=criterion.rank_key, reverse=True)
    winner = ranked[0]
    reason = _reason(winner, ranked, criterion)

    select_run_id = tracker.find_or_create_run(
        _experiment_name(tracker, parent),
        f"select/{parent.info.run_id}/{time.strftime('%Y%m%d-%H%M%S')}",
        run_name=f"select-{alias}", kind="select", parent_run_id=parent.info.run_id,
        tags={"crackray.selected_run_id": winner.run_id},
    )
    test, intervals, photos = _test_winner(tracker, select_run_id, winner)
    alerts = _alerts(test, criterion)
    tracker.log_params(select_run_id, {
        "select.by": criterion.objective, "select.min_precision": criterion.min_precision,
        "select.target_recall": criterion.target_recall, "select.alias": alias,
        "select.name": name, "select.winner_run_id": winner.run_id,
        "select.threshold": winner.threshold,
    })
    tracker.log_metrics(select_run_id, {"threshold": winner.threshold,
                                        **{f"val/{k}": v for k, v in winner.val.items()},
                                        **test, **interval_metrics(intervals)})
    table = format_candidates(candidates, winner, criterion)
    summary = format_intervals(test, intervals, photos)
    tracker.log_text(select_run_id, "\n\n".join([table, reason, summary, *alerts]) + "\n",
                     "selection.txt")
    tracker.log_json(select_run_id, {"level": 0.95, "resamples": BOOTSTRAP_RESAMPLES,
                                     "photos": photos, "resampled": "photo ids, with replacement",
                                     "intervals": intervals}, "test/bootstrap.json")
    model_uri, calibrated = _log_model(tracker, select_run_id, winner, criterion)
    tracker.log_artifact(select_run_id, calibrated, "checkpoints")
    source_model = tracker.best_model_id(winner.run_id)
    version = tracker.register(model_uri, name, alias,
                               tags={"threshold": f"{winner.threshold:.6g}",
                                     "source_run_id": winner.run_id,
                                     **({"source_model_id": source_model} if source_model else {})})
    tracker.end_run(select_run_id, "FINISHED")
    tracker.flush(timeout_s=60)
    return Selection(parent.info.run_id, select_run_id, winner, candidates, test, model_uri,
                     version, table, reason, intervals, alerts)


def _experiment_name(tracker: Tracker, run) -> str:
    return tracker.client.get_experiment(run.info.experiment_id).name


def _reason(winner: Candidate, ranked: list[Candidate], criterion: Criterion) -> str:
    text = (f"{winner.name} wins: {criterion.describe()} -> val {criterion.objective} "
            f"{winner.val[criterion.objective]:.4f} at threshold {winner.threshold:.4f}")
    if len(ranked) > 1:
        runner = ranked[1]
        for key in (criterion.objective, "f1", "auroc"):
            a, b = winner.val.get(key, math.nan), runner.val.get(key, math.nan)
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                tie = "" if key == criterion.objective else f" (tied on {criterion.objective}; " \
                                                           f"broken by {key})"
                text += f"; runner-up {runner.name} has {key} {b:.4f} vs {a:.4f}{tie}"
                break
        else:
            text += (f"; tied with {runner.name} on {criterion.objective}, F1 and AUROC: "
                     "the earlier trial is kept")
    return text


def _test_winner(tracker: Tracker, run_id: str, winner: Candidate) -> tuple[dict, dict, int]:
    """The one look at the test split, at the validation-calibrated threshold: its metrics,
    their photo-grouped bootstrap intervals and the number of test photos."""
    model, cfg, _ = checkpoints.build_model_from_file(winner.model_file)
    test = predict_split(model, cfg, TEST)
    metrics = split_metrics(test, "test", winner.threshold)
    metrics["test/ap"] = average_precision(test.probs, test.targets)
    metrics.update(per_surface_metrics(test, "test/surface", winner.threshold))
    if winner.pixel_threshold is not None:
        metrics.update(pixel_split_metrics(test, "test", winner.val["pixel_threshold"],
                                           segdec_threshold=winner.val["segdec_threshold"])[1])
    tracker.log_artifacts(run_id, decision_artifacts(test, winner.threshold, "test"))
    photos = photo_ids_of(cfg.data.path, test)
    intervals = photo_bootstrap(test.probs, test.targets, photos, winner.threshold,
                                resamples=BOOTSTRAP_RESAMPLES)
    return metrics, intervals, len(set(photos))


def photo_ids_of(data_path: str, test: EvalOutputs) -> list[str]:
    """The photo id of each predicted test tile (prediction keeps the shards' row order)."""
    table = read_split_table(data_path, TEST, ["path", "photo_id"])
    if table.column("path").to_pylist() != list(test.paths):
        raise CrackrayError(f"{data_path}: the test shards changed while select read them")
    return table.column("photo_id").to_pylist()


def interval_metrics(intervals: dict) -> dict[str, float]:
    return {f"test/{name}_ci95_{end}": bound for name, (low, high) in intervals.items()
            for end, bound in (("low", low), ("high", high))}


def format_intervals(test: dict, intervals: dict, photos: int) -> str:
    cells = [f"{name} {test[f'test/{name}']:.4f} [{low:.4f}, {high:.4f}]"
             for name, (low, high) in intervals.items()]
    return (f"test, 95 % bootstrap intervals ({BOOTSTRAP_RESAMPLES} resamples of the "
            f"{photos} test photos): " + "  ".join(cells))


def _alerts(test: dict, criterion: Criterion) -> list[str]:
    precision = test.get("test/precision", math.nan)
    if criterion.min_precision > 0 and precision < criterion.min_precision:
        return [f"warning: test precision {precision:.4f} is below the floor "
                f"{criterion.min_precision:g} the threshold was calibrated to on validation"]
    return []


def _log_model(tracker: Tracker, run_id: str, winner: Candidate,
               criterion: Criterion) -> tuple[str, Path]:
    """Log the winner as the servable pyfunc (deploy/serving.py: base64 image bytes in,
    probability and decision out) around its weights-only crackray model file, calibrated:
    the threshold (and a segdec mask threshold) chosen on validation go into the file, which
    `crackray predict` and the served model both load."""
    from crackray.deploy.serving import log_servable  # MLflow's pyfunc machinery: only here

    _, cfg, payload = checkpoints.build_model_from_file(winner.model_file)
    calibrated = scratch_folder("select-") / MODEL_FILE
    extras = {k: v for k, v in payload.items() if k not in ("model_state", "config")}
    if winner.pixel_threshold is not None:
        extras["pixel_threshold"] = winner.pixel_threshold
    checkpoints.save_model_file(calibrated, payload["model_state"], cfg, **extras,
                                threshold=winner.threshold, source_run_id=winner.run_id,
                                criterion=criterion.describe())
    metadata = {
        "threshold": winner.threshold,
        "decision": "crack iff probability >= threshold",
        "input": "DataFrame column `image`: base64-encoded image bytes (a tile or a photo)",
        "image_size": cfg.data.image_size, "tile": checkpoints.trained_tile(payload),
        "model_name": cfg.model.name, "source_run_id": winner.run_id,
        "criterion": criterion.describe(), "crackray_model_file": f"artifacts/{MODEL_FILE}",
    }
    if winner.pixel_threshold is not None:
        metadata["pixel_threshold"] = winner.pixel_threshold
        metadata["mask"] = "base64 PNG: crack pixel iff the map at the image's size >= it"
    return log_servable(tracker, run_id, calibrated, metadata), calibrated


def format_candidates(candidates: list[Candidate], winner: Candidate, criterion: Criterion) -> str:
    columns = ["", "trial", "run_id", "threshold", "recall", "precision", "f1", "auroc", "note"]
    rows = []
    for c in sorted(candidates, key=lambda c: (c.eligible, criterion.rank_key(c) if c.eligible
                                               else (c.closest, 0, 0)), reverse=True):
        if c.eligible:
            cells = [f"{c.threshold:.4f}"] + [f"{c.val[k]:.4f}" for k in
                                              ("recall", "precision", "f1", "auroc")]
            note = "winner" if c is winner else ""
        else:
            cells = ["-"] * 5
            note = f"misses the criterion (best reachable: {c.closest:.3f})"
        rows.append(["*" if c is winner else "", c.name, c.run_id[:12], *cells, note])
    widths = [max(len(col), *(len(r[i]) for r in rows)) for i, col in enumerate(columns)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return f"candidates ({criterion.describe()}, on validation):\n" + "\n".join(lines)
