"""A classifier's page: decision metrics on validation and test, per surface, training curves,
confusion matrix, PR and ROC curves, the worst mistakes and the run's parameters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crackray import plots
from crackray.data.images import decode_rgb, encode_png
from crackray.data.shards import read_manifest, read_split_table
from crackray.data.splits import TEST
from crackray.engine import EvalOutputs
from crackray.errors import CrackrayError
from crackray.evaluation import per_surface_metrics
from crackray.metrics import classification_metrics, confusion_matrix, pr_curve, roc_curve
from crackray.report.markdown import histories, save_figure, table
from crackray.scores import SCORE_KEYS
from crackray.tracking import Tracker

if TYPE_CHECKING:
    from crackray.report.run import EvaluatedRun

GALLERY_SIZE = 8  # worst false negatives / false positives shown
LOSS_KEYS = ["train/loss", "val/loss"]


def page(tracker: Tracker, evaluated: EvaluatedRun, out: Path) -> str:
    run, cfg, val, test = evaluated.run, evaluated.cfg, evaluated.val, evaluated.test
    threshold = evaluated.threshold
    parts = [f"# Run {run.info.run_name}", "", evaluated.heading,
             "", "## Dataset", "", _dataset_table(cfg.data.path), "",
             "## Decision", "", f"Threshold {threshold:.4f} ({evaluated.why}); crack iff "
             "probability >= threshold.", "", _decision_table(val, test, threshold), "",
             "## Per surface (test)", "", _surface_table(test, threshold), ""]
    parts += _curves(tracker, run, out)
    parts += _decision_figures(test, threshold, out)
    parts += _gallery(cfg.data.path, test, threshold, out)
    parts += ["## Run parameters", "", table(["parameter", "value"],
                                             sorted(run.data.params.items())), ""]
    return "\n".join(parts)


def _dataset_table(path: str) -> str:
    try:
        manifest = read_manifest(path)
    except CrackrayError as exc:
        return f"(dataset unavailable: {exc})"
    rows = [[split, t["samples"], t["crack"], t["no_crack"]]
            for split, t in manifest["totals"].items()]
    return table(["split", "samples", "positives (crack)", "negatives (no crack)"], rows)


def _decision_table(val: EvalOutputs, test: EvalOutputs, threshold: float) -> str:
    rows = []
    for name, outputs, t in (("val", val, threshold), ("test", test, threshold),
                             ("test @ 0.5", test, 0.5)):
        m = classification_metrics(outputs.probs, outputs.targets, t)
        rows.append([name, m["precision"], m["recall"], m["f1"], m["accuracy"], m["auroc"], t,
                     m["tp"], m["fp"], m["fn"], m["tn"]])
    return table(["split", "precision", "recall", "F1", "accuracy", "AUROC", "threshold",
                  "TP", "FP", "FN", "TN"], rows)


def _surface_table(test: EvalOutputs, threshold: float) -> str:
    metrics = per_surface_metrics(test, "s", threshold)
    surfaces = sorted({key.split("/")[1] for key in metrics})
    keys = ["samples", "positives", "precision", "recall", "f1", "accuracy", "auroc"]
    return table(["surface", *keys], [[s, *[metrics[f"s/{s}/{k}"] for k in keys]]
                                      for s in surfaces])


def _curves(tracker: Tracker, run, out: Path) -> list[str]:
    history, _ = histories(tracker, run.info.run_id, LOSS_KEYS + list(SCORE_KEYS))
    if not history:
        return ["## Training curves", "", "(no per-epoch metrics in this run)", ""]
    loss = save_figure(plots.history_figure(history, LOSS_KEYS, "loss", "loss"),
                       out / "loss_curves.png")
    score = save_figure(plots.history_figure(history, list(SCORE_KEYS), "validation scores"),
                        out / "score_curves.png")
    return ["## Training curves", "", f"![loss]({loss}) ![scores]({score})", ""]


def _decision_figures(test: EvalOutputs, threshold: float, out: Path) -> list[str]:
    matrix = confusion_matrix(test.probs, test.targets, threshold)
    images = [save_figure(plots.confusion_matrix_figure(matrix, f"test @ {threshold:.2f}"),
                          out / "confusion_matrix.png")]
    if len(set(test.targets.tolist())) == 2:
        precision, recall, _ = pr_curve(test.probs, test.targets)
        images.append(save_figure(plots.curve_figure(recall, precision, xlabel="recall",
                                                     ylabel="precision",
                                                     title="test PR (crack)"),
                                  out / "pr_curve.png"))
        fpr, tpr, _ = roc_curve(test.probs, test.targets)
        images.append(save_figure(plots.curve_figure(fpr, tpr, xlabel="false positive rate",
                                                     ylabel="true positive rate",
                                                     title="test ROC (crack)", diagonal=True),
                                  out / "roc_curve.png"))
    return ["## Confusion matrix, PR and ROC curves (test)", "",
            " ".join(f"![{Path(i).stem}]({i})" for i in images), ""]


def _gallery(data_path: str, test: EvalOutputs, threshold: float, out: Path) -> list[str]:
    """The test tiles the model is most wrong about: cracks with the lowest probability
    (false negatives) and intact tiles with the highest (false positives)."""
    fn = np.flatnonzero((test.targets == 1) & (test.probs < threshold))
    fp = np.flatnonzero((test.targets == 0) & (test.probs >= threshold))
    fn = fn[np.argsort(test.probs[fn])][:GALLERY_SIZE]
    fp = fp[np.argsort(-test.probs[fp])][:GALLERY_SIZE]
    wanted = {str(test.paths[i]) for i in np.concatenate([fn, fp])}
    images = {}
    if wanted:
        rows = read_split_table(data_path, TEST, ["path", "image"]).to_pylist()
        images = {r["path"]: r["image"] for r in rows if r["path"] in wanted}
    parts = ["## Worst mistakes (test)", ""]
    for title, picks, tag in (("False negatives (missed cracks)", fn, "fn"),
                              ("False positives (false alarms)", fp, "fp")):
        parts += [f"### {title}", ""]
        if len(picks) == 0:
            parts += ["none", ""]
            continue
        cells = []
        for rank, i in enumerate(picks, 1):
            path = str(test.paths[i])
            name = f"gallery/{tag}_{rank:02d}.png"
            (out / "gallery").mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(encode_png(decode_rgb(images[path])))
            cells.append([f"![{tag}{rank}]({name})", path, float(test.probs[i])])
        parts += [table(["tile", "path", "probability"], cells), ""]
    return parts
