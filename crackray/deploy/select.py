"""`crackray select`: pick the deployment model of a tuning job, calibrate its threshold on
validation, test it once, log it with MLflow and point a registry alias at it.

Selection happens on validation only: each finished trial's best checkpoint predicts the
validation split, a threshold is calibrated there (the precision floor, or the recall target),
and the winner is the trial with the best calibrated recall (or precision). The test split is
looked at once, for the winner, at the threshold chosen on validation.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crackray import checkpoints
from crackray.data.splits import TEST, VAL
from crackray.data.transforms import MEAN, STD
from crackray.deploy.predict import MODEL_FILE
from crackray.engine import EvalOutputs, crack_logits
from crackray.errors import CrackrayError
from crackray.evaluation import (
    decision_artifacts,
    per_surface_metrics,
    pixel_split_metrics,
    split_metrics,
)
from crackray.inference import predict_split
from crackray.metrics import (
    classification_metrics,
    pr_curve,
    threshold_for_min_precision,
    threshold_for_min_recall,
)
from crackray.tracking import Tracker

SELECTABLE = ("finished", "early_stopped")  # crackray.trial_status values with a full run


class CrackProbability(torch.nn.Module):
    """What is logged to MLflow: preprocessed images (B, 3, H, W) -> crack probability (B,).

    The sigmoid is part of the served model so that its output is on the same scale as the
    calibrated threshold stored with it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(crack_logits(self.model(images)).float())


@dataclass
class Candidate:
    run_id: str
    name: str
    model_file: Path
    threshold: float | None = None
    val: dict = field(default_factory=dict)  # validation metrics at `threshold`
    closest: float = math.nan  # the best value of the constrained metric this trial reaches
    # Segmentation models: the pixel threshold of their masks, swept on validation (2-px F1).
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


@dataclass(frozen=True)
class Criterion:
    """--by recall (with a precision floor) or --target-recall (best precision above it)."""

    min_precision: float
    target_recall: float | None = None

    @property
    def objective(self) -> str:
        return "recall" if self.target_recall is None else "precision"

    def describe(self) -> str:
        if self.target_recall is None:
            return f"highest val recall at precision >= {self.min_precision:g}"
        floor = f" and precision >= {self.min_precision:g}" if self.min_precision > 0 else ""
        return f"highest val precision at recall >= {self.target_recall:g}{floor}"

    def calibrate(self, val: EvalOutputs) -> tuple[float | None, float]:
        """(threshold or None, the best value the constrained metric reaches)."""
        precision, recall, _ = pr_curve(val.probs, val.targets)
        # The curve's last point (precision 1, recall 0) has no threshold: not reachable.
        precision, recall = precision[:-1], recall[:-1]
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


def find_parent(tracker: Tracker, experiment: str | None, parent_run_id: str | None):
    if parent_run_id:
        parent = tracker.get_run(parent_run_id)
        if parent.data.tags.get("crackray.kind") != "tune":
            raise CrackrayError(f"run {parent_run_id} is not a tuning job (crackray.kind="
                                f"{parent.data.tags.get('crackray.kind')!r})")
        return parent
    parent = tracker.latest_run_anywhere("tune", experiment)
    if parent is None:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        raise CrackrayError(f"no tuning job in {where} of {tracker.uri}: run `crackray tune` first")
    return parent


def finished_trials(tracker: Tracker, parent) -> list:
    trials = tracker.child_runs(parent.info.run_id, kind="trial")
    done = [t for t in trials if t.info.status == "FINISHED"
            and t.data.tags.get("crackray.trial_status") in SELECTABLE]
    if not done:
        statuses = ", ".join(
            f"{t.info.run_name}: {t.data.tags.get('crackray.trial_status', t.info.status)}"
            for t in trials) or "no trials at all"
        raise CrackrayError(f"tuning job {parent.info.run_name} ({parent.info.run_id}) has no "
                            f"finished trials ({statuses})")
    return done


def evaluate_candidate(tracker: Tracker, run, criterion: Criterion) -> Candidate:
    """Predict validation with the trial's best checkpoint and calibrate its threshold."""
    model_file = tracker.download(run.info.run_id, f"checkpoints/{checkpoints.BEST_FILE}")
    candidate = Candidate(run.info.run_id, run.info.run_name, model_file)
    model, cfg, _ = checkpoints.build_model_from_file(model_file)
    val = predict_split(model, cfg, VAL)
    candidate.threshold, candidate.closest = criterion.calibrate(val)
    if candidate.eligible:
        candidate.val = classification_metrics(val.probs, val.targets, candidate.threshold)
        if val.seg_probs:
            candidate.pixel_threshold, pixel = pixel_split_metrics(val, VAL)
            candidate.val.update({k.removeprefix(f"{VAL}/"): v for k, v in pixel.items()})
    return candidate


def run_selection(*, tracking_uri: str | None, experiment: str | None, parent_run_id: str | None,
                  criterion: Criterion, alias: str, name: str) -> Selection:
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    parent = find_parent(tracker, experiment, parent_run_id)
    trials = finished_trials(tracker, parent)
    candidates = [evaluate_candidate(tracker, run, criterion) for run in trials]
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
    test = _test_winner(tracker, select_run_id, winner)
    tracker.log_params(select_run_id, {
        "select.by": criterion.objective, "select.min_precision": criterion.min_precision,
        "select.target_recall": criterion.target_recall, "select.alias": alias,
        "select.name": name, "select.winner_run_id": winner.run_id,
        "select.threshold": winner.threshold,
    })
    tracker.log_metrics(select_run_id, {"threshold": winner.threshold,
                                        **{f"val/{k}": v for k, v in winner.val.items()},
                                        **test})
    table = format_candidates(candidates, winner, criterion)
    tracker.log_text(select_run_id, table + "\n\n" + reason + "\n", "selection.txt")
    model_uri, calibrated = _log_model(tracker, select_run_id, winner, criterion)
    tracker.log_artifact(select_run_id, calibrated, "checkpoints")
    version = tracker.register(model_uri, name, alias,
                               tags={"threshold": f"{winner.threshold:.6g}",
                                     "source_run_id": winner.run_id})
    tracker.end_run(select_run_id, "FINISHED")
    tracker.flush(timeout_s=60)
    return Selection(parent.info.run_id, select_run_id, winner, candidates, test, model_uri,
                     version, table, reason)


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


def _test_winner(tracker: Tracker, run_id: str, winner: Candidate) -> dict:
    """The one look at the test split, at the validation-calibrated threshold."""
    model, cfg, _ = checkpoints.build_model_from_file(winner.model_file)
    test = predict_split(model, cfg, TEST)
    metrics = split_metrics(test, "test", winner.threshold)
    metrics.update(per_surface_metrics(test, "test/surface", winner.threshold))
    if winner.pixel_threshold is not None:
        metrics.update(pixel_split_metrics(test, "test", winner.pixel_threshold)[1])
    tracker.log_artifacts(run_id, decision_artifacts(test, winner.threshold, "test"))
    return metrics


def _log_model(tracker: Tracker, run_id: str, winner: Candidate,
               criterion: Criterion) -> tuple[str, Path]:
    """Log the winner as an MLflow PyTorch model (image tensor in, crack probability out) with
    the preprocessing and threshold it needs, plus the weights-only crackray model file that
    `crackray predict` loads without unpickling code."""
    model, cfg, payload = checkpoints.build_model_from_file(winner.model_file)
    size = cfg.data.image_size
    calibrated = Path(tempfile.mkdtemp(prefix="crackray-select-")) / MODEL_FILE
    extras = {k: v for k, v in payload.items() if k not in ("model_state", "config")}
    if winner.pixel_threshold is not None:
        extras["pixel_threshold"] = winner.pixel_threshold
    checkpoints.save_model_file(calibrated, payload["model_state"], cfg, **extras,
                                threshold=winner.threshold, source_run_id=winner.run_id,
                                criterion=criterion.describe())
    wrapped = CrackProbability(model).eval()
    # Two mid-grey images: a batch of one would pin the saved signature to batch size 1.
    grey = np.full((2, size, size, 3), 128, dtype=np.float32)
    example = ((grey - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32)
    with torch.no_grad():
        output = wrapped(torch.from_numpy(example)).numpy()
    metadata = {
        "threshold": winner.threshold,
        "decision": "crack iff probability >= threshold",
        "image_size": size,
        "preprocessing": (f"decode RGB, resize to {size}x{size} (bilinear), "
                          "(pixel - mean) / std with ImageNet mean/std in 0..255 units, NCHW"),
        "mean": [float(v) for v in MEAN], "std": [float(v) for v in STD],
        "model_name": cfg.model.name, "source_run_id": winner.run_id,
        "criterion": criterion.describe(), "crackray_model_file": f"extra_files/{MODEL_FILE}",
    }
    if winner.pixel_threshold is not None:
        metadata["pixel_threshold"] = winner.pixel_threshold
        metadata["mask"] = "crack pixel iff the map, upsampled to the image, >= pixel_threshold"
    uri = tracker.log_pytorch_model(run_id, wrapped, input_example=example, output_example=output,
                                    metadata=metadata, extra_files=[str(calibrated)])
    return uri, calibrated


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
