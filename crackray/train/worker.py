"""`train_fn_per_worker`: the Ray Train loop, the same code on every worker. One epoch of
maths lives in `engine.py`; this file adds the distributed parts (each worker's share of the
data, reports), with progress and checkpoints in `state.py` and rank-0 tracking in
`epoch_log.py`."""

from __future__ import annotations

from dataclasses import dataclass

import ray.train
import ray.train.torch
import torch

from crackray import checkpoints
from crackray.config import RunConfig
from crackray.data.epochs import training_epoch
from crackray.data.pipeline import iterate_batches
from crackray.data.splits import VAL
from crackray.engine import (
    Objective,
    broadcast,
    broadcast_buffers,
    evaluate,
    gather,
    train_one_epoch,
)
from crackray.evaluation import pixel_split_metrics, ranking_metrics, split_metrics
from crackray.inference import split_batches
from crackray.models import create_model, model_segments
from crackray.optim import Schedule, build_optimizer
from crackray.scores import OBJECTIVE_KEY, objective
from crackray.train.epoch_log import EpochLogger
from crackray.train.hooks import Hook, run_hooks
from crackray.train.state import Checkpointer


@dataclass(frozen=True)
class WorkerSettings:
    """What the driver hands every worker, bound to `train_fn_per_worker` (driver.py)."""

    run: RunConfig
    pos_weight: float
    steps_per_epoch: int
    run_folder: str  # this run's folder in the storage path: the epoch checkpoints
    tracking: dict | None = None  # {"uri", "run_id"} of the MLflow run rank 0 logs to
    tile: int | None = None  # px the training photos were cut into (manifest), for predict
    hooks: tuple[Hook, ...] = ()  # called at named points of the loop (train/hooks.py)


def train_fn_per_worker(settings: WorkerSettings) -> None:
    cfg, epochs = settings.run, settings.run.train.epochs
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    segments = model_segments(cfg.model.name)
    run_hooks(settings.hooks, "start", rank)

    model, objective, optimizer, schedule = _training_parts(cfg, settings, device)
    checkpointer = Checkpointer(cfg, settings.run_folder, rank, settings.tile)
    state, best_weights, unregistered = checkpointer.restore(model, optimizer, schedule)
    logger = EpochLogger.on_rank_zero(rank, settings.tracking, cfg, segments, settings.hooks)
    if logger:
        logger.catch_up(state, best_weights, checkpointer)
    if unregistered is not None:
        checkpointer.report_again(state, unregistered)
    steps = dict(epochs=epochs, bf16=cfg.train.bf16, device=device)

    for epoch in state.epochs_left(epochs):
        train_stats = train_one_epoch(model, _train_batches(cfg, epoch, rank, segments, device),
                                      objective, optimizer, epoch=epoch, schedule=schedule,
                                      grad_clip=cfg.train.grad_clip,
                                      freeze_bn=cfg.model.freeze_bn, **steps)
        run_hooks(settings.hooks, f"epoch{epoch}", rank)  # trained; not evaluated or saved
        # Every rank evaluates rank 0's weights and BatchNorm statistics: the metrics then
        # belong to the checkpoint rank 0 saves. The plain module, not DDP: DDP's forward
        # broadcasts too, a collective that hangs when the disjoint evaluation shards give
        # the workers different batch counts.
        broadcast_buffers(checkpoints.unwrap(model))
        val_batches = _val_batches(cfg, rank, segments, device)
        val = gather(evaluate(checkpoints.unwrap(model), val_batches, objective, epoch=epoch,
                              keep_seg_maps=segments, **steps))

        # Rank 0 scores the epoch (the others hold no outputs and never load torchmetrics);
        # every rank records the same numbers, so all agree on the best epoch and on stopping.
        metrics = broadcast(_epoch_metrics(cfg, train_stats, val, epoch, segments)
                            if rank == 0 else None)
        improved = state.record(epoch, metrics, metrics[OBJECTIVE_KEY],
                                cfg.train.early_stopping_min_delta,
                                cfg.train.early_stopping_patience)
        metrics["early_stopped"] = int(state.stopped_early)
        schedule.step_epoch(metrics[OBJECTIVE_KEY])
        if improved:
            best_weights = checkpoints.cpu_state(model)
            if rank == 0:  # kept in the checkpoint: a restart redraws its MLflow artifacts
                state.best_val_outputs = {"probs": torch.from_numpy(val.probs),
                                          "targets": torch.from_numpy(val.targets)}
        if logger:  # the driver prints a warning while MLflow is away (worker logs are off)
            metrics["tracking/pending_writes"] = logger.tracker.pending_writes
        with checkpointer.epoch_checkpoint(model, optimizer, schedule, state,
                                           best_weights) as (checkpoint, best_file):
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch-{epoch:04d}")
            if logger:
                logger.log_epoch(epoch, metrics, val, improved, best_file, model, device)
        if state.stopped_early:
            break
    if logger:
        logger.close()


def _training_parts(cfg: RunConfig, settings: WorkerSettings, device: torch.device):
    """Model (DDP-wrapped), loss, optimizer and learning-rate schedule of one worker."""
    torch.manual_seed(cfg.train.seed)
    if device.type == "cpu" and cfg.train.threads_per_worker is not None:
        torch.set_num_threads(cfg.train.threads_per_worker)  # else Ray's one per reserved CPU
    model = create_model(cfg.model.name, pretrained=cfg.model.pretrained,
                         dropout=cfg.model.dropout, image_size=cfg.data.image_size,
                         weights=cfg.model.weights)
    segments = model_segments(cfg.model.name)
    if segments:
        model.gradient_adjustment = cfg.train.gradient_adjustment
    if device.type == "cuda":
        # Batches arrive channels-last (transforms.to_model_input); weights in the same layout
        # let cuDNN pick its NHWC kernels instead of converting at every convolution.
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    objective = Objective(cfg, settings.pos_weight, segments)
    optimizer = build_optimizer(model, cfg.optim)  # head and backbone groups
    schedule = Schedule(optimizer, cfg.optim, cfg.train.epochs, settings.steps_per_epoch)
    return model, objective, optimizer, schedule


def _train_batches(cfg: RunConfig, epoch: int, rank: int, segments: bool,
                   device: torch.device):
    """This worker's equal share of the epoch, in the epoch's own uniform random order (a
    function of train.seed and the epoch only, so a resumed run repeats it)."""
    world_size = ray.train.get_context().get_world_size()
    epoch_rows = training_epoch(cfg, epoch, rank=rank, world_size=world_size,
                                with_masks=segments)
    return iterate_batches(epoch_rows, cfg.train.batch_size, device)


def _val_batches(cfg: RunConfig, rank: int, segments: bool, device: torch.device):
    """This worker's part of the validation split, read and decoded in the worker itself:
    an evaluation split is small next to an epoch, and a Ray Data split of it would start a
    split coordinator actor every run and an executor every epoch (README "Performance")."""
    world_size = ray.train.get_context().get_world_size()
    return split_batches(cfg, VAL, cfg.train.eval_batch_size, device, with_masks=segments,
                         rank=rank, world_size=world_size)


def _epoch_metrics(cfg: RunConfig, train_stats: dict, val, epoch: int, segments: bool) -> dict:
    metrics = {f"train/{k}": v for k, v in train_stats.items()}
    metrics.update(split_metrics(val, VAL))  # at 0.5, for comparison with older runs
    metrics.update(ranking_metrics(val, VAL, cfg.train.objective_min_precision))
    if segments:
        metrics.update(pixel_split_metrics(val, VAL)[1])
    metrics[OBJECTIVE_KEY] = objective(cfg, metrics, segments)
    metrics["epoch"] = epoch
    metrics["epochs_planned"] = cfg.train.epochs
    return metrics
