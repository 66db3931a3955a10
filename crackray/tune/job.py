"""`crackray tune`: a Ray Tune job over Ray Train trials, OptunaSearch (TPE) + ASHA, one
MLflow parent run per job and one child run per trial, resumable after a crash or Ctrl-C."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from crackray.config import ExperimentFile, TuneConfig
from crackray.models import model_segments
from crackray.runs import (
    absolute_storage,
    log_run_lineage,
    resolve_data,
    run_params,
    run_to_resume,
)
from crackray.runtime import ensure_ray
from crackray.scores import objective_name
from crackray.tracking import Tracker
from crackray.tune.progress import TrialPrinter
from crackray.tune.resources import plan_resources, trial_base
from crackray.tune.results import TuneSummary, finish_job
from crackray.tune.space import ConditionalSpace, check_search_values
from crackray.tune.trial import PrunedAwareOptunaSearch, TrialContext, trial_trainable


def run_tuning(
    experiment: ExperimentFile,
    file: str | Path,
    *,
    resume: bool = False,
    address: str | None = None,
    verbose: bool = False,
) -> TuneSummary:
    check_search_values(experiment)
    base, manifest = resolve_data(trial_base(experiment))
    tcfg = experiment.tune
    tracker = Tracker(base.tracking.uri)
    tracker.check_reachable()
    exp_name = base.tracking.experiment or Path(file).stem
    storage = absolute_storage(tcfg.storage_path)

    params = run_params(base, manifest)
    previous = run_to_resume(tracker, exp_name, "tune", params, "base.") if resume else None
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
    tracker.log_params(parent_run_id, {f"base.{k}": v for k, v in params.items()})
    tracker.log_artifact(parent_run_id, file)
    log_run_lineage(tracker, parent_run_id, manifest, base.data.path)

    ensure_ray(address, verbose=verbose)
    plan = plan_resources(tcfg, ray.cluster_resources())
    print(plan.describe())
    job = TrialContext(
        base=base,
        manifest=manifest,
        job_name=job_name,
        experiment=exp_name,
        tracking_uri=tracker.uri,
        parent_run_id=parent_run_id,
        trials_storage=f"{storage}/{job_name}/train_runs",
    )
    trainable = trial_trainable(job, plan.driver_bundle)
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
                reuse_actors=True,  # crackray.tune.reuse
                search_alg=PrunedAwareOptunaSearch(
                    space=ConditionalSpace(experiment.search, base),
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
                # Tune's result tables only with --verbose: TrialPrinter tells the story.
                verbose=1 if verbose else 0,
                callbacks=[TrialPrinter(objective_name(base, model_segments(base.model.name)))],
            ),
        )
    results = tuner.fit()
    return finish_job(tracker, exp_name, parent_run_id, job_name, experiment, results)


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
