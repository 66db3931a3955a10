"""The driver side of a Ray Train run: `build_trainer` (one per `crackray train` run and per
tuning trial) and `run_training` (the `crackray train` command: one run, one MLflow run, one
test pass)."""

from __future__ import annotations

import functools
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from ray.train.v2._internal.callbacks import DatasetsCallback

from crackray import checkpoints
from crackray.config import RunConfig, save_resolved
from crackray.data.composition import epoch_rows
from crackray.holdout import evaluate_on_test
from crackray.losses import resolve_pos_weight
from crackray.runs import (
    absolute_storage,
    fetch_best_model,
    log_run_lineage,
    resolve_data,
    run_params,
    run_to_resume,
    train_counts,
)
from crackray.runtime import ensure_ray
from crackray.tracking import Tracker
from crackray.train.backend import ProcessGroupConfig
from crackray.train.hooks import hooks_from_environment
from crackray.train.progress import EpochPrinter
from crackray.train.worker import WorkerSettings, train_fn_per_worker


class CrackrayTrainer(ray.train.torch.TorchTrainer):
    """A TorchTrainer without Ray Data's per-run `DatasetManager` actor (and so without
    `datasets`): each worker reads its own data, yet Ray Train starts that actor for every
    run, one more process booting Python and Ray while the workers start (Ray 2.60). The
    callback's other job, handing the driver's DataContext to the workers, is not needed:
    a worker's datasets take their settings from `pipeline._configure_ray_data`."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]


def build_trainer(
    cfg: RunConfig,
    manifest: dict,
    *,
    tracking: dict | None,
    name: str,
    storage_path: str,
    callbacks: list | None = None,
) -> CrackrayTrainer:
    """The TorchTrainer of one run: workers, datasets, checkpointing and failure policy."""
    n_pos, n_neg = train_counts(manifest)
    rows_per_worker = epoch_rows(cfg, n_pos, n_neg) // cfg.train.workers
    # No datasets for Ray Train to split: each worker builds its own part of every training
    # epoch (epochs.training_epoch, reshuffled per epoch) and reads its own part of the
    # validation split (inference.split_batches).
    settings = WorkerSettings(
        run=cfg,
        pos_weight=resolve_pos_weight(cfg, n_pos, n_neg),
        steps_per_epoch=max(1, math.ceil(rows_per_worker / cfg.train.batch_size)),
        run_folder=f"{storage_path}/{name}",
        tracking=tracking,
        tile=manifest.get("tile"),
        hooks=hooks_from_environment(),
    )
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    # Train's controller (a new process per run and trial) unpickles `train_loop_config` and
    # the backend config: the settings, whose class lives beside the training loop, imported
    # torch and crackray's training code there, and so did Ray's TorchConfig (~3 s of every
    # trial, README "Performance"). Bound to the function, the settings reach the workers
    # only, inside the function Train ships to them by object ref.
    return CrackrayTrainer(
        functools.partial(train_fn_per_worker, settings),
        torch_config=ProcessGroupConfig(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
    )


@dataclass
class TrainingResult:
    run_id: str
    best_model: Path
    history: list[dict]
    test_metrics: dict[str, float]
    seconds: float


def run_training(
    cfg: RunConfig,
    *,
    resume: bool = False,
    storage_path: str = "ray_results",
    experiment: str | None = None,
    verbose: bool = False,
) -> TrainingResult:
    """`crackray train`: one Ray Train run tracked as one MLflow run, then one test pass."""
    start = time.perf_counter()
    cfg, manifest = resolve_data(cfg)
    tracker = Tracker(cfg.tracking.uri)
    tracker.check_reachable()
    experiment = experiment or cfg.tracking.experiment or "crackray"
    storage = absolute_storage(storage_path)
    params = run_params(cfg, manifest)

    if resume:
        previous = run_to_resume(tracker, experiment, "train", params)
        name = previous.data.tags["crackray.ray_run_name"]
    else:
        name = f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = tracker.find_or_create_run(
        experiment,
        f"train/{name}",
        run_name=name,
        kind="train",
        tags={"crackray.ray_run_name": name, "crackray.storage_path": storage},
    )
    tracker.log_params(run_id, params)
    log_run_lineage(tracker, run_id, manifest, cfg.data.path)
    with tempfile.TemporaryDirectory() as folder:
        tracker.log_artifact(run_id, save_resolved(cfg, Path(folder) / "config.yaml"))

    ensure_ray(verbose=verbose)
    with EpochPrinter(cfg) as printer:
        trainer = build_trainer(
            cfg,
            manifest,
            tracking={"uri": tracker.uri, "run_id": run_id},
            name=name,
            storage_path=storage,
            callbacks=[printer.callback],
        )
        result = trainer.fit()
    best = fetch_best_model(result.checkpoint)
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(Path(folder) / checkpoints.STATE_FILE, weights_only=True)
    history = saved["training_state"]["history"]
    test_metrics = evaluate_on_test(tracker, run_id, best)
    tracker.end_run(run_id, "FINISHED")
    tracker.flush(timeout_s=60)
    return TrainingResult(run_id, best, history, test_metrics, time.perf_counter() - start)
