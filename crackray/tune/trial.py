"""One Tune trial: `trial_driver` builds a `TorchTrainer` of the base config with the
sampled params and forwards its reports to Tune (the Train V2 pattern; `Tuner(trainer)` is
deprecated), in a driver process that Tune hands to the next trial (`crackray.tune.reuse`).
`PrunedAwareOptunaSearch` tells Optuna which trials ASHA cut short."""

from __future__ import annotations

from dataclasses import dataclass

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.optuna import OptunaSearch

from crackray.config import RunConfig, with_params
from crackray.runs import log_run_lineage, run_params
from crackray.tracking import Tracker
from crackray.train.driver import build_trainer
from crackray.tune.reuse import StopOnRequest, reusable, stop_flag


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one tuning job shares, handed to each trial driver."""

    base: RunConfig
    manifest: dict
    job_name: str
    experiment: str
    tracking_uri: str
    parent_run_id: str
    trials_storage: str  # where each trial's Ray Train run folder goes


def trial_driver(params: dict, *, job: TrialContext) -> None:
    """One Tune trial: a Ray Train run of the base config with the sampled params, tracked
    as one MLflow child run of the job's parent run."""
    cfg = with_params(job.base, params)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    tracker = Tracker(job.tracking_uri)
    run_id = tracker.find_or_create_run(
        job.experiment,
        f"{job.job_name}/{trial_id}",
        run_name=context.get_trial_name(),
        kind="trial",
        parent_run_id=job.parent_run_id,
        tags={"crackray.trial_id": trial_id},
    )
    stop = stop_flag()
    stop.unlink(missing_ok=True)  # left by a run of an earlier process with this pid
    tracker.log_params(run_id, run_params(cfg, job.manifest))
    log_run_lineage(tracker, run_id, job.manifest, cfg.data.path, parent_run_id=job.parent_run_id)
    trainer = build_trainer(
        cfg,
        job.manifest,
        tracking={"uri": tracker.uri, "run_id": run_id},
        name=trial_id,
        storage_path=job.trials_storage,
        callbacks=[TuneReportCallback(), StopOnRequest(stop)],
    )
    try:
        trainer.fit()
    except Exception:
        if stop.exists():
            return  # Tune stopped this trial and aborted its Train run to reuse this process
        raise


def trial_trainable(job: TrialContext, driver_bundle: dict) -> type:
    """The trainable Tune runs for each trial of `job`, on a driver process it may reuse."""
    return reusable(tune.with_resources(tune.with_parameters(trial_driver, job=job), driver_bundle))


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
