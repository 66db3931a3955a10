"""A segmenting model's page, section by section as the SegDec results page this project
started from (../shared/seeds/002): Dataset, Run parameters, Decision, 2 pixel distance (the
SegDec protocol), then the loss, decision-loss, segmentation-loss, validation-loss and scores
plots. crackray's symmetric-tolerance pixel metric follows the 2-pixel table.

Thresholds come from validation: the decision threshold as for every page (select's
calibration, else the best validation F1), each pixel protocol's own swept on validation, the
test pass's rule (`holdout.evaluate_on_test`), so the tables equal the run's `test/...` metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from crackray import plots
from crackray.config import RunConfig
from crackray.data.shards import read_manifest
from crackray.data.splits import TEST, TRAIN, VAL
from crackray.errors import CrackrayError
from crackray.evaluation import pixel_split_metrics
from crackray.metrics import classification_metrics
from crackray.report.markdown import histories, save_figure, table
from crackray.scores import SCORE_KEYS
from crackray.tracking import Tracker

if TYPE_CHECKING:
    from crackray.report.run import EvaluatedRun

DIGITS = 6  # the seed page's precision
# (file, title, metric keys) of the plots, in the seed's order
PLOTS = [
    ("loss.png", "Loss", ["train/loss"]),
    ("loss_dec.png", "Dec Loss", ["train/dec"]),
    ("loss_seg.png", "Seg Loss", ["train/seg"]),
    ("loss_val.png", "Val Loss", ["val/loss"]),
]
PIXEL_SCORE_KEYS = ["val/segdec_f1", "val/pixel_f1"]
_SETS = [("Train", TRAIN), ("Test", TEST), ("Validation", VAL)]  # the seed's order


def page(tracker: Tracker, evaluated: EvaluatedRun, out: Path) -> str:
    run, cfg = evaluated.run, evaluated.cfg
    dataset = _manifest(cfg.data.path)
    name = dataset.get("dataset", Path(cfg.data.path).name) if dataset else cfg.data.path
    parts = [f"# Results of training on {name} dataset", "", evaluated.heading, "",
             "## Dataset", "", *_dataset_tables(cfg, dataset, evaluated), "",
             "## Run parameters", "", _parameter_table(cfg), "",
             "### Decision", "",
             f"Test split; crack iff probability >= threshold ({evaluated.why}).", "",
             _decision_table(evaluated), ""]
    parts += _pixel_tables(evaluated)
    parts += _plots(tracker, run.info.run_id, out)
    return "\n".join(parts)


def _manifest(path: str) -> dict | None:
    try:
        return read_manifest(path)
    except CrackrayError:
        return None


def _dataset_tables(cfg: RunConfig, manifest: dict | None, evaluated: EvaluatedRun) -> list:
    if manifest is None:
        return [f"(dataset `{cfg.data.path}` unavailable)"]
    totals = manifest["totals"]

    def count(split: str, key: str) -> int:
        return int(totals.get(split, {}).get(key, 0))

    sizes = sorted({m.shape for m in evaluated.test.masks})
    scored = ", ".join(f"{h} x {w}" for h, w in sizes) or "-"
    parameters = [["Input channels", 3], ["Input height", cfg.data.image_size],
                  ["Input width", cfg.data.image_size],
                  *[[f"{label} samples", count(split, "samples")] for label, split in _SETS],
                  ["Masks scored at (height x width)", scored]]
    rows = [[label, count(split, "crack"), count(split, "no_crack"), count(split, "samples")]
            for label, split in _SETS]
    rows.append(["**Sum**", *[sum(row[i] for row in rows) for i in (1, 2, 3)]])
    return [table(["Parameter", "Value"], parameters), "",
            table(["Set", "Positives", "Negatives", "Sum"], rows)]


def _parameter_table(cfg: RunConfig) -> str:
    train, data, loss, optim = cfg.train, cfg.data, cfg.loss, cfg.optim
    rows = [
        ["Batch size", f"{train.batch_size} per worker x {train.workers} workers"],
        ["Epochs", train.epochs],
        ["Learning rate", optim.lr],
        ["Delta CLS Loss", loss.delta_cls],
        ["Dilate", data.dilate],
        ["Dynamically balanced loss", loss.dynamic_balance],
        ["Gradient-flow adjustment", train.gradient_adjustment],
        ["Frequency-of-use sampling", data.frequency_sampling],
        ["Weighted segmentation loss", loss.weighted_seg],
        ["Best model type", train.best_model],
        ["Pixel protocol (best model, select)", train.pixel_protocol],
        ["Use negatives", data.use_negatives],
        ["Augmentation", data.augment],
        ["Optimizer", optim.name],
    ]
    return table(["Parameter", "Value"], rows, DIGITS)


def _decision_table(evaluated: EvaluatedRun) -> str:
    m = classification_metrics(evaluated.test.probs, evaluated.test.targets, evaluated.threshold)
    return table(["Precision", "Recall", "F1", "Accuracy", "Threshold", "TP", "FP", "FN", "TN"],
                 [[m["precision"], m["recall"], m["f1"], m["accuracy"], evaluated.threshold,
                   m["tp"], m["fp"], m["fn"], m["tn"]]], DIGITS)


def pixel_test_metrics(evaluated: EvaluatedRun) -> dict[str, float]:
    """`test/pixel_*` and `test/segdec_*` at the thresholds swept on validation."""
    _, val = pixel_split_metrics(evaluated.val, VAL)
    return pixel_split_metrics(evaluated.test, TEST, val[f"{VAL}/pixel_threshold"],
                               segdec_threshold=val[f"{VAL}/segdec_threshold"])[1]


def _pixel_tables(evaluated: EvaluatedRun) -> list[str]:
    m = pixel_test_metrics(evaluated)
    keys = ["precision", "recall", "f1", "threshold"]
    return [
        "### 2 pixel distance", "",
        "Test split, the SegDec protocol: per image, predicted pixels (probability > threshold) "
        "within the ground truth dilated by a 5 x 5 cross are true positives, ground-truth "
        "pixels missed are false negatives (no tolerance); means over the images. Threshold "
        "swept on validation.", "",
        table(["Precision", "Recall", "F1", "Threshold"],
              [[m[f"test/segdec_{k}"] for k in keys]], DIGITS), "",
        "### 2 pixel tolerance, symmetric (crackray)", "",
        "Test split: pooled over the pixels, a 2-px Euclidean tolerance both ways (probability "
        ">= threshold); its own threshold swept on validation.", "",
        table(["Precision", "Recall", "F1", "Dice", "IoU", "Threshold"],
              [[m[f"test/pixel_{k}"] for k in ("precision", "recall", "f1", "dice", "iou",
                                               "threshold")]], DIGITS), "",
    ]


def _plots(tracker: Tracker, run_id: str, out: Path) -> list[str]:
    scores = [*SCORE_KEYS, *PIXEL_SCORE_KEYS]
    history, logged = histories(tracker, run_id,
                                [k for _, _, keys in PLOTS for k in keys] + scores)
    if not history:
        return ["## Losses", "", "(no per-epoch metrics in this run)", ""]
    parts = ["## Losses", ""]
    for file, title, keys in PLOTS:
        if logged.intersection(keys):
            figure = plots.history_figure(history, keys, title, "loss")
            parts += [f"![{title}](./{save_figure(figure, out / file)})", ""]
    shown = [k for k in scores if k in logged]
    figure = plots.history_figure(history, shown, "validation scores")
    parts += ["## Scores", "", f"![Scores](./{save_figure(figure, out / 'scores.png')})", ""]
    return parts

