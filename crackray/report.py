"""`crackray report`: a Markdown results page of a run (train / trial / select) or of a tuning
job (trials table + the best trial's page), written to a folder and logged to MLflow.

The numbers come from a fresh pass of the run's model over validation and test, so the page
shows the same decision threshold, confusion matrix, curves and worst mistakes everywhere.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from crackray import checkpoints, plots
from crackray.data.images import decode_rgb, encode_png
from crackray.data.shards import read_manifest, read_split_table
from crackray.data.splits import TEST, VAL
from crackray.deploy.predict import MODEL_FILE_NAMES
from crackray.engine import EvalOutputs
from crackray.errors import CrackrayError
from crackray.evaluation import per_surface_metrics, pixel_split_metrics
from crackray.inference import predict_split
from crackray.metrics import (
    best_f1_threshold,
    classification_metrics,
    confusion_matrix,
    pr_curve,
    roc_curve,
)
from crackray.models import model_segments
from crackray.scores import OBJECTIVE_KEY, SCORE_KEYS
from crackray.tracking import Tracker

GALLERY_SIZE = 8  # worst false negatives / false positives shown
LOSS_KEYS = ["train/loss", "val/loss"]
SEGDEC_LOSS_KEYS = ["train/seg", "train/dec"]  # segdec's parts of the training loss


def build_report(run_id: str, out: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Write `out/report.md` (+ PNGs) for `run_id`, log the folder to the run; returns the file."""
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    run = tracker.get_run(run_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if run.data.tags.get("crackray.kind") == "tune":
        page = _tune_page(tracker, run, out)
    else:
        page = _run_page(tracker, run, out)
    report = out / "report.md"
    report.write_text(page)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            parent = path.parent.relative_to(out)
            tracker.log_artifact(run_id, path, "report" if parent == Path(".")
                                 else f"report/{parent.as_posix()}")
    tracker.flush(timeout_s=60)
    return report


# ------------------------------------------------------------------------- markdown helpers


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None or value == "" else str(value).replace("|", "\\|")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plots.close(fig)
    return path.name


# ------------------------------------------------------------------------- tuning job


def _tune_page(tracker: Tracker, run, out: Path) -> str:
    trials = tracker.child_runs(run.info.run_id, kind="trial")
    if not trials:
        raise CrackrayError(f"tuning job {run.info.run_id} has no trial runs")
    searched = _searched_keys(trials)
    rows = [[t.info.run_name, t.data.tags.get("crackray.trial_status", t.info.status),
             *[t.data.params.get(k) for k in searched],
             *[t.data.metrics.get(k, math.nan) for k in SCORE_KEYS],
             t.info.run_id] for t in trials]
    objective_column = 2 + len(searched) + SCORE_KEYS.index(OBJECTIVE_KEY)
    rows.sort(key=lambda r: -np.nan_to_num(r[objective_column], nan=-1.0))
    best_id = run.data.tags.get("crackray.best_run_id") or (rows[0][-1] if rows else None)
    parts = [f"# Tuning job {run.info.run_name}", "",
             f"MLflow run `{run.info.run_id}`, {len(trials)} trials; best trial: `{best_id}`.", "",
             f"## Trials (last epoch's validation metrics, by {OBJECTIVE_KEY})", "",
             table(["trial", "status", *searched, *SCORE_KEYS, "run_id"], rows), ""]
    if best_id:
        (out / "best_trial" / "report.md").write_text(
            _run_page(tracker, tracker.get_run(best_id), out / "best_trial"))
        parts += ["## Best trial", "", "See [best_trial/report.md](best_trial/report.md).", ""]
    return "\n".join(parts)


def _searched_keys(trials) -> list[str]:
    """Config keys whose value differs between trials (the searched parameters)."""
    keys = set().union(*(t.data.params for t in trials))
    return sorted(k for k in keys if len({t.data.params.get(k) for t in trials}) > 1
                  and not k.startswith(("version.", "git_")))


# ------------------------------------------------------------------------- one run


def _model_file(tracker: Tracker, run) -> Path:
    for name in MODEL_FILE_NAMES:
        try:
            return tracker.download(run.info.run_id, f"checkpoints/{name}")
        except Exception:  # noqa: BLE001 - absent artifact: try the next name
            continue
    raise CrackrayError(f"run {run.info.run_id} has no checkpoints/best_model.pt artifact")


def _run_page(tracker: Tracker, run, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    model, cfg, payload = checkpoints.build_model_from_file(_model_file(tracker, run))
    val, test = predict_split(model, cfg, VAL), predict_split(model, cfg, TEST)
    if "threshold" in payload:
        threshold = float(payload["threshold"])
        why = f"calibrated by select: {payload.get('criterion', '')}"
    else:
        threshold, why = best_f1_threshold(val.probs, val.targets), "best validation F1"
    parts = [f"# Run {run.info.run_name}", "",
             f"MLflow run `{run.info.run_id}` (kind {run.data.tags.get('crackray.kind', '?')}), "
             f"model `{cfg.model.name}` at {cfg.data.image_size} px, dataset `{cfg.data.path}`.",
             "", "## Dataset", "", _dataset_table(cfg.data.path), "",
             "## Decision", "", f"Threshold {threshold:.4f} ({why}); crack iff probability >= "
             "threshold.", "", _decision_table(val, test, threshold), "",
             "## Per surface (test)", "", _surface_table(test, threshold), ""]
    if model_segments(cfg.model.name):
        parts += ["## 2 pixel distance", "", _pixel_table(val, test), ""]
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


def _pixel_table(val: EvalOutputs, test: EvalOutputs) -> str:
    """Pixel metrics with a 2-pixel tolerance: threshold swept on validation, applied to test."""
    threshold, val_metrics = pixel_split_metrics(val, "val")
    _, test_metrics = pixel_split_metrics(test, "test", threshold)
    keys = ["precision", "recall", "f1", "dice", "iou"]
    rows = [[name, *[m[f"{name}/pixel_{k}"] for k in keys], threshold]
            for name, m in (("val", val_metrics), ("test", test_metrics))]
    return table(["split", *keys, "threshold"], rows)


def _curves(tracker: Tracker, run, out: Path) -> list[str]:
    keys = LOSS_KEYS + SEGDEC_LOSS_KEYS + list(SCORE_KEYS)
    histories = {k: tracker.metric_history(run.info.run_id, k) for k in keys}
    epochs = sorted(set().union(*(h.keys() for h in histories.values())))
    if not epochs:
        return ["## Training curves", "", "(no per-epoch metrics in this run)", ""]
    history = [{"epoch": e, **{k: h.get(e, math.nan) for k, h in histories.items()}}
               for e in epochs]
    loss_keys = LOSS_KEYS + [k for k in SEGDEC_LOSS_KEYS if histories[k]]
    loss = _save(plots.history_figure(history, loss_keys, "loss", "loss"), out / "loss_curves.png")
    score = _save(plots.history_figure(history, list(SCORE_KEYS), "validation scores"),
                  out / "score_curves.png")
    return ["## Training curves", "", f"![loss]({loss}) ![scores]({score})", ""]


def _decision_figures(test: EvalOutputs, threshold: float, out: Path) -> list[str]:
    matrix = confusion_matrix(test.probs, test.targets, threshold)
    images = [_save(plots.confusion_matrix_figure(matrix, f"test @ {threshold:.2f}"),
                    out / "confusion_matrix.png")]
    if len(set(test.targets.tolist())) == 2:
        precision, recall, _ = pr_curve(test.probs, test.targets)
        images.append(_save(plots.curve_figure(recall, precision, xlabel="recall",
                                               ylabel="precision", title="test PR (crack)"),
                            out / "pr_curve.png"))
        fpr, tpr, _ = roc_curve(test.probs, test.targets)
        images.append(_save(plots.curve_figure(fpr, tpr, xlabel="false positive rate",
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

