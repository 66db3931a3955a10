"""Tuning jobs: search-space YAML -> Optuna distributions; OptunaSearch (TPE) + ASHA over
Ray Train trials; one MLflow parent run per job and one child run per trial; resume.

Train V2 pattern: each Tune trial runs `trial_driver`, a small function that builds a
`TorchTrainer` and forwards its reports to Tune through `TuneReportCallback`.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from crackray import plots
from crackray.config import Distribution, ExperimentFile, RunConfig, TuneConfig, with_params
from crackray.errors import ConfigError, CrackrayError
from crackray.tracking import Tracker
from crackray.train import (
    absolute_storage,
    build_trainer,
    ensure_ray,
    evaluate_on_test,
    fetch_best_model,
    resolve_data,
    run_params,
)

DRIVER_MEMORY = 256 * 1024**2  # a trial driver only builds the trainer: no CPU, a little memory
INGEST_MIN_CPUS = 1.0  # Ray Data's read / decode tasks need at least one free CPU


# ------------------------------------------------------------------------- search space


def to_optuna(search: dict[str, Distribution]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Search-space entries -> Optuna distributions, one to one."""
    out = {}
    for key, dist in search.items():
        if dist.type == "categorical":
            out[key] = optuna.distributions.CategoricalDistribution(dist.choices)
        elif dist.type == "int":
            out[key] = optuna.distributions.IntDistribution(
                int(dist.low), int(dist.high), log=dist.log, step=int(dist.step or 1)
            )
        else:
            out[key] = optuna.distributions.FloatDistribution(
                dist.low, dist.high, log=dist.log, step=dist.step
            )
    return out


def check_search_values(experiment: ExperimentFile) -> None:
    """Every value a distribution can produce must validate in the base config (e.g. a model
    name in `choices` that does not exist), checked before Ray starts."""
    for key, dist in experiment.search.items():
        probes = dist.choices if dist.type == "categorical" else [dist.low, dist.high]
        for value in probes:
            if dist.type == "int":
                value = int(value)
            try:
                with_params(experiment.base, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"search.{key}: value {value!r} is invalid: {exc}") from None
        if key == "model.name":
            from crackray.models import list_models

            unknown = [c for c in dist.choices or [] if c not in list_models()]
            if unknown:
                raise ConfigError(
                    f"search.model.name: unknown models {unknown}. "
                    f"Supported: {', '.join(list_models())}"
                )


# ------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class ResourcePlan:
    """What each part of a tuning job reserves, derived from the cluster's size."""

    cluster_cpus: float
    cluster_gpus: float
    concurrent_trials: int
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float
    driver_bundle: dict = field(default_factory=lambda: {"CPU": 0, "memory": DRIVER_MEMORY})

    @property
    def cpus_for_training(self) -> float:
        return self.concurrent_trials * self.workers_per_trial * self.cpus_per_worker

    @property
    def cpus_for_ingest(self) -> float:
        return self.cluster_cpus - self.cpus_for_training

    def describe(self) -> str:
        gpu = f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return (
            f"resource plan: {self.cluster_cpus:g} CPUs, {self.cluster_gpus:g} GPUs; "
            f"{self.concurrent_trials} concurrent trial(s) x {self.workers_per_trial} workers "
            f"x {self.cpus_per_worker:g} CPU{gpu}; "
            f"trial drivers 0 CPU; {self.cpus_for_ingest:g} CPUs left for Ray Data ingest"
        )


def plan_resources(cfg: TuneConfig, cluster: dict) -> ResourcePlan:
    """Fit concurrent trials x workers into the cluster while leaving CPUs for ingest: with
    every CPU taken by Train workers, Ray Data's tasks wait forever ('backpressured:
    ResourceBudget') and the job hangs."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    per_trial_cpus = cfg.workers_per_trial * cfg.cpus_per_worker
    fits_cpu = math.floor((cpus - INGEST_MIN_CPUS) / per_trial_cpus + 1e-9)
    fits = min(cfg.max_concurrent_trials, fits_cpu)
    if cfg.gpus_per_worker > 0:
        fits = min(fits, math.floor(gpus / (cfg.workers_per_trial * cfg.gpus_per_worker) + 1e-9))
    if fits < 1:
        gpu = f" x {cfg.gpus_per_worker:g} GPU" if cfg.gpus_per_worker else ""
        raise ConfigError(
            f"tune: one trial needs {cfg.workers_per_trial} workers x {cfg.cpus_per_worker:g} CPU"
            f"{gpu} plus "
            f"{INGEST_MIN_CPUS:g} CPU for ingest, but the cluster has {cpus:g} CPUs and "
            f"{gpus:g} GPUs: lower tune.workers_per_trial or tune.cpus_per_worker"
        )
    return ResourcePlan(
        cpus, gpus, fits, cfg.workers_per_trial, cfg.cpus_per_worker, cfg.gpus_per_worker
    )


def trial_base(experiment: ExperimentFile) -> RunConfig:
    """The base run config with the tuning job's worker layout applied."""
    base = experiment.base.model_copy(deep=True)
    base.train.workers = experiment.tune.workers_per_trial
    base.train.cpus_per_worker = experiment.tune.cpus_per_worker
    base.train.use_gpu = experiment.tune.gpus_per_worker > 0
    return base


# ------------------------------------------------------------------------- trials


def trial_driver(params: dict, *, job: dict) -> None:
    """One Tune trial: a Ray Train run of the base config with the sampled params."""
    cfg = with_params(RunConfig.model_validate(job["base"]), params)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    tracker = Tracker(job["tracking_uri"])
    run_id = tracker.find_or_create_run(
        job["experiment"],
        f"{job['name']}/{trial_id}",
        run_name=context.get_trial_name(),
        kind="trial",
        parent_run_id=job["parent_run_id"],
        tags={"crackray.trial_id": trial_id},
    )
    tracker.log_params(run_id, run_params(cfg, job["manifest"]))
    trainer = build_trainer(
        cfg,
        job["manifest"],
        tracking={"uri": tracker.uri, "run_id": run_id},
        name=trial_id,
        storage_path=job["trials_storage"],
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna a trial cut short by ASHA is PRUNED.

    Ray's OptunaSearch reports a scheduler-stopped trial as COMPLETE with its last value,
    which would teach TPE that a half-trained trial is a finished result.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and not error and cut_short(result):
            result = None  # OptunaSearch records "no value, no error" as PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)


def cut_short(result: dict) -> bool:
    """Did a trial stop before its planned epochs without early stopping?"""
    planned = result.get("epochs_planned")
    epoch = result.get("epoch")
    if planned is None or epoch is None:
        return False
    return epoch + 1 < planned and not result.get("early_stopped")


# ------------------------------------------------------------------------- the job


@dataclass
class TuneSummary:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    table: str
    rows: list[dict]
    best_test_metrics: dict


def run_tuning(
    experiment: ExperimentFile,
    file: str | Path,
    *,
    resume: bool = False,
    address: str | None = None,
) -> TuneSummary:
    check_search_values(experiment)
    distributions = to_optuna(experiment.search)
    base, manifest = resolve_data(trial_base(experiment))
    tcfg = experiment.tune
    tracker = Tracker(base.tracking.uri)
    tracker.check_reachable()
    exp_name = base.tracking.experiment or Path(file).stem
    storage = absolute_storage(tcfg.storage_path)

    previous = tracker.latest_run(exp_name, kind="tune", unfinished=True) if resume else None
    if resume and previous is None:
        raise ConfigError(
            f"--resume: no unfinished tuning job of experiment '{exp_name}' in {tracker.uri}"
        )
    job_name = (
        previous.data.tags["crackray.job_name"]
        if previous
        else f"{tcfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    parent_run_id = tracker.find_or_create_run(
        exp_name,
        f"tune/{job_name}",
        run_name=job_name,
        kind="tune",
        tags={"crackray.job_name": job_name, "crackray.storage_path": storage},
    )
    tracker.log_params(
        parent_run_id, {f"base.{k}": v for k, v in run_params(base, manifest).items()}
    )
    tracker.log_artifact(parent_run_id, file)

    ensure_ray(address)
    plan = plan_resources(tcfg, ray.cluster_resources())
    print(plan.describe())
    job = {
        "base": base.model_dump(),
        "manifest": manifest,
        "name": job_name,
        "experiment": exp_name,
        "tracking_uri": tracker.uri,
        "parent_run_id": parent_run_id,
        "trials_storage": f"{storage}/{job_name}/train_runs",
    }
    trainable = tune.with_resources(tune.with_parameters(trial_driver, job=job), plan.driver_bundle)
    job_path = f"{storage}/{job_name}"
    if previous is not None and tune.Tuner.can_restore(job_path):
        tuner = tune.Tuner.restore(job_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=tcfg.metric,
                mode=tcfg.mode,
                num_samples=tcfg.num_samples,
                max_concurrent_trials=plan.concurrent_trials,
                search_alg=PrunedAwareOptunaSearch(
                    space=distributions,
                    metric=tcfg.metric,
                    mode=tcfg.mode,
                    sampler=optuna.samplers.TPESampler(seed=tcfg.seed),
                    storage=_optuna_storage(storage, job_name),
                    study_name=job_name,
                    points_to_evaluate=[dict(p) for p in tcfg.points_to_evaluate] or None,
                ),
                scheduler=_scheduler(tcfg, experiment),
                time_budget_s=tcfg.time_budget_s,
            ),
            run_config=tune.RunConfig(
                name=job_name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=tcfg.max_failures),
                verbose=1,
            ),
        )
    results = tuner.fit()
    return _finish_job(tracker, exp_name, parent_run_id, job_name, experiment, results)


def _optuna_storage(storage: str, job_name: str):
    """Optuna's study in a SQLite file beside the job, so its trial states can be read after
    the job (and survive a restore); object-store jobs keep the study in memory."""
    if "://" in storage:
        return None
    folder = Path(storage) / job_name
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")


def _scheduler(tcfg: TuneConfig, experiment: ExperimentFile):
    if tcfg.scheduler.name == "fifo":
        return FIFOScheduler()
    epochs = experiment.base.train.epochs
    if "train.epochs" in experiment.search:
        epochs = int(experiment.search["train.epochs"].high)
    # max_t one past the last epoch: with max_t == epochs ASHA "stops" every trial on its
    # final report, racing the trial's own end-of-run bookkeeping.
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs + 1,
        grace_period=min(tcfg.scheduler.grace_period, epochs),  # ASHA needs grace <= max_t
        reduction_factor=tcfg.scheduler.reduction_factor,
    )


SCORE_KEYS = ("val/f1", "val/recall", "val/precision", "val/auroc")


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


def _finish_job(
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
    columns = ["trial_id", "status", "epochs_run", *params, "val/f1", "val/recall", "val/precision"]

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
