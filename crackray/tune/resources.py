"""How a tuning job fits into the cluster: concurrent trials, workers per trial, what the
trial drivers reserve, and the CPUs left for Ray Data ingest."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from crackray.config import ExperimentFile, RunConfig, TuneConfig
from crackray.errors import ConfigError

DRIVER_MEMORY = 256 * 1024**2  # a trial driver only builds the trainer: no CPU, a little memory
INGEST_MIN_CPUS = 1.0  # Ray Data's read / decode tasks need at least one free CPU


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
