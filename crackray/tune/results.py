"""After a tuning job: each trial's row and MLflow status (pruned trials KILLED), ranking by
the job's metric at each trial's best epoch, one test pass of the best trial, and the
parent run's trials table and plots."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray import tune

from crackray import plots
from crackray.config import ExperimentFile
from crackray.errors import CrackrayError
from crackray.holdout import evaluate_on_test
from crackray.runs import fetch_best_model
from crackray.scores import SCORE_KEYS
from crackray.tracking import Tracker


@dataclass
class TuneSummary:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    table: str
    rows: list[dict]
    best_test_metrics: dict


def best_epoch_scores(result, metric: str, mode: str) -> dict:
    """A trial's validation scores at its best epoch by the job's metric, not its last one:
    trials are ranked (and their best checkpoint tested) by what they reached."""
    frame = result.metrics_dataframe
    keys = list(dict.fromkeys((*SCORE_KEYS, metric)))
    if frame is None or metric not in frame or frame[metric].isna().all():
        last = result.metrics or {}
        return {key: last.get(key) for key in keys}
    best = frame.loc[frame[metric].idxmax() if mode == "max" else frame[metric].idxmin()]
    return {key: (float(best[key]) if key in best else None) for key in keys}


def trial_status(result) -> str:
    if result.error is not None:
        return "failed"
    metrics = result.metrics or {}
    if not metrics:
        return "failed"
    if metrics.get("epoch", -1) + 1 >= metrics.get("epochs_planned", 0):
        return "finished"  # ran every epoch (even if patience ran out on the last one)
    return "early_stopped" if metrics.get("early_stopped") else "pruned"


_MLFLOW_STATUS = {
    "finished": "FINISHED",
    "early_stopped": "FINISHED",
    "pruned": "KILLED",
    "failed": "FAILED",
    "interrupted": "KILLED",
}


def finish_job(
    tracker: Tracker,
    exp_name: str,
    parent_run_id: str,
    job_name: str,
    experiment: ExperimentFile,
    results,
) -> TuneSummary:
    """Close every child run with its real status (pruned trials as KILLED), test the best
    trial once, and give the parent run its trials table, plots and best-trial summary."""
    tcfg = experiment.tune
    # Ctrl-C (issue 7): Tune saved the job's state, then stopped the trials and returned. The
    # saved state (not `results`, whose trials are stopped by now) tells which trials did not
    # finish; their runs and the parent are closed KILLED, which `--resume` looks for.
    saved = tune.ExperimentAnalysis(results.experiment_path)
    unfinished = {t.trial_id for t in saved.trials if t.status not in ("TERMINATED", "ERROR")}
    rows = [
        _close_trial_run(tracker, exp_name, job_name, experiment, result, unfinished)
        for result in results
    ]
    if unfinished:
        tracker.end_run(parent_run_id, "KILLED")
        tracker.flush(timeout_s=60)
        raise CrackrayError(
            f"tuning job {job_name} interrupted; Ray Tune saved its state in "
            f"{results.experiment_path}: continue it with `crackray tune "
            f"<file> --resume`"
        )

    sign = 1 if tcfg.mode == "max" else -1
    scored = [r for r in rows if r[tcfg.metric] is not None and r["status"] != "failed"]
    scored.sort(key=lambda r: sign * r[tcfg.metric], reverse=True)
    best_test = {}
    if scored:
        best = scored[0]
        best_test = _test_best(tracker, best)
        tracker.log_metrics(parent_run_id, {f"best/{k}": v for k, v in best_test.items()})
        tracker.log_json(parent_run_id, {"best_trial": best, "test": best_test}, "best_trial.json")
        tracker.set_tags(parent_run_id, {"crackray.best_run_id": best["run_id"]})
    _log_job_artifacts(tracker, parent_run_id, rows, experiment)
    tracker.end_run(parent_run_id, "FINISHED")
    tracker.flush(timeout_s=60)
    ordered = scored + [r for r in rows if r not in scored]
    return TuneSummary(
        exp_name,
        parent_run_id,
        tracker.uri,
        format_table(ordered, list(experiment.search), tcfg.metric),
        ordered,
        best_test,
    )


def _close_trial_run(
    tracker: Tracker,
    exp_name: str,
    job_name: str,
    experiment: ExperimentFile,
    result,
    unfinished: set[str],
) -> dict:
    """One trial's row of the trials table; its MLflow run is tagged and closed with the
    status the trial really ended in."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name
    status = "interrupted" if trial_id in unfinished else trial_status(result)
    run = tracker.find_run(exp_name, f"{job_name}/{trial_id}")
    if run is not None:
        tags = {"crackray.trial_status": status}
        if result.error is not None:
            tags["crackray.error"] = str(result.error)[:4000]
        tracker.set_tags(run.info.run_id, tags)
        tracker.end_run(run.info.run_id, _MLFLOW_STATUS[status])
    return {
        "trial_id": trial_id,
        "status": status,
        "epochs_run": (metrics.get("epoch", -1) + 1) if metrics else 0,
        **{k: result.config.get(k) for k in experiment.search},
        **best_epoch_scores(result, experiment.tune.metric, experiment.tune.mode),
        "checkpoint_path": metrics.get("checkpoint_path"),
        "run_id": run.info.run_id if run else None,
    }


def _test_best(tracker: Tracker, best: dict) -> dict:
    """The job's one look at the test split: the best trial's best-F1 checkpoint."""
    if not best.get("checkpoint_path") or not best.get("run_id"):
        return {}
    local = fetch_best_model(ray.train.Checkpoint(best["checkpoint_path"]))
    return evaluate_on_test(tracker, best["run_id"], local)


def _log_job_artifacts(
    tracker: Tracker, parent_run_id: str, rows: list[dict], experiment: ExperimentFile
) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tracker.log_text(parent_run_id, buffer.getvalue(), "trials.csv")
    metric = experiment.tune.metric
    for key in experiment.search:
        points = [(r[key], r[metric]) for r in rows if r[metric] is not None]
        if not points:
            continue
        fig = plots.param_figure(points, key, metric, log=experiment.search[key].log)
        tracker.log_figure(parent_run_id, fig, f"params/{key}.png")
        plots.close(fig)


def format_table(rows: list[dict], params: list[str], metric: str, top: int = 10) -> str:
    """The end-of-job terminal table of the top trials."""
    columns = ["trial_id", "status", "epochs_run", *params, *SCORE_KEYS[:4]]

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    body = [[cell(r.get(c)) for c in columns] for r in rows[:top]]
    widths = [
        max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return f"top trials by {metric}:\n" + "\n".join(lines)
