"""`crackray bench train`: training images/s of one Ray Train worker fed by Ray Data against
the same model, batches and optimizer in a plain loop in one process."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from crackray.bench.baseline import ShardDataset, plain_batches, plain_loader
from crackray.bench.common import (
    CROSS,
    PLAIN,
    alternating,
    bench_config,
    cores,
    in_fresh_process,
    start_ray,
    steady,
    stop_ray,
    summary,
    training_parts,
)
from crackray.bench.gpu_utilisation import GpuUtilisation
from crackray.bench.memory import PeakMemory, dataloader_workers, ray_side
from crackray.config import RunConfig
from crackray.errors import ConfigError
from crackray.models import model_segments

# Training rounds last tens of seconds: a 1 s poll resolves the peak and costs the timed side
# ~1 % of a core.
MEMORY_POLL_S = 1.0


def _epoch_record(stats: dict, epoch: int) -> dict:
    return {"epoch": epoch, "images": stats["samples"], "seconds": round(stats["seconds"], 3),
            "torch_threads": torch.get_num_threads()}


def _ray_train_loop(config: dict) -> list[dict]:
    """crackray's Train worker loop, trimmed to training: the worker's own shuffled epoch
    (epochs.training_epoch) -> iterate_batches -> engine.train_one_epoch. Returns the
    per-epoch samples and seconds."""
    import ray.train
    import ray.train.torch

    from crackray.data.epochs import training_epoch
    from crackray.data.pipeline import iterate_batches
    from crackray.engine import train_one_epoch

    cfg = RunConfig.model_validate(config["run"])
    device = ray.train.torch.get_device()
    if device.type == "cpu" and cfg.train.threads_per_worker is not None:
        torch.set_num_threads(cfg.train.threads_per_worker)
    model, objective, optimizer = training_parts(cfg, device)
    if device.type == "cuda":  # as the product's worker: channels-last weights for NHWC batches
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    history = []
    for epoch in range(cfg.train.epochs):
        rows = training_epoch(cfg, epoch)  # one worker: the whole epoch
        if config["limit"] is not None:
            rows = rows.limit(config["limit"])
        batches = iterate_batches(rows, cfg.train.batch_size, device)
        with GpuUtilisation(enabled=device.type == "cuda") as utilisation:
            stats = train_one_epoch(model, batches, objective, optimizer, epoch=epoch,
                                    epochs=cfg.train.epochs, grad_clip=cfg.train.grad_clip,
                                    bf16=cfg.train.bf16, device=device)
        history.append({**_epoch_record(stats, epoch), "gpu_utilisation_pct": utilisation.mean})
    return history


def ray_fit(cfg: RunConfig, limit: int | None, storage: str, use_gpu: bool = False) -> list[dict]:
    """One Ray Train worker (with one GPU if `use_gpu`) over the training split."""
    import ray.train
    import ray.train.torch

    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = ray.train.torch.TorchTrainer(
        _ray_train_loop,
        train_loop_config={"run": cfg.model_dump(), "limit": limit},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"bench-{time.time_ns()}", storage_path=storage),
    )
    return trainer.fit().return_value


def _plain_fit(cfg: RunConfig, limit: int | None, device: torch.device) -> list[dict]:
    """The same epochs in one process: decode and augment inline, then the same train step."""
    from crackray.data.splits import TRAIN
    from crackray.engine import train_one_epoch

    model, objective, optimizer = training_parts(cfg, device)
    loader = plain_loader(ShardDataset(cfg.data.path, TRAIN, cfg.data.image_size,
                                       cfg.data.augment, limit), cfg.train.batch_size, 0)
    history = []
    for epoch in range(cfg.train.epochs):
        stats = train_one_epoch(model, plain_batches(loader, device), objective, optimizer,
                                epoch=epoch, epochs=cfg.train.epochs,
                                grad_clip=cfg.train.grad_clip, bf16=cfg.train.bf16,
                                device=device)
        history.append(_epoch_record(stats, epoch))
    return history


def _measured(processes: Callable[[], list], fit: Callable[..., list[dict]],
              *args) -> tuple[list[dict], float]:
    """`fit(*args)`'s epochs and the peak PSS (MiB) of `processes()` meanwhile. The plain side
    runs it in a fresh process a round (`in_fresh_process`), so that each side's memory is its
    own: rounds in the benchmark's process left the plain loop's heap in the Ray side's figure
    (the benchmark's process is its driver) and Ray's client in the plain one."""
    with PeakMemory(processes, interval_s=MEMORY_POLL_S) as memory:
        history = fit(*args)
    return history, round(memory.peak_mib, 1)


def bench_train(data: str | Path, *, model: str = "simple_cnn", image_size: int = 224,
                batch_size: int = 32, epochs: int = 2, repeats: int = 2,
                limit: int | None = None, threads: int | None = None) -> dict:
    """The worker reserves half the CPUs and Ray Data decodes on the other half; its torch
    threads (`threads`, default: all cores, as many as the plain loop uses) also cover the
    ingest half, which decoding leaves idle most of the time next to a model's compute.
    """
    if model_segments(model):
        raise ConfigError(f"bench train: --model {model} is a segmentation model; "
                          "benchmark a classifier (e.g. simple_cnn, resnet18)")
    # Half the CPUs train, half ingest (on 2 cores: 1 + 1, as crackray's resource plan leaves).
    cfg = bench_config(data, image_size=image_size, batch_size=batch_size, model=model,
                       epochs=epochs, cpus_per_worker=max(1.0, cores() // 2),
                       threads_per_worker=threads or cores())
    cpu = torch.device("cpu")
    started = start_ray()
    rounds = []
    try:
        with tempfile.TemporaryDirectory(prefix="crackray-bench-") as storage:
            play = {CROSS: lambda: _measured(ray_side, ray_fit, cfg, limit, storage),
                    PLAIN: lambda: in_fresh_process(_measured, dataloader_workers, _plain_fit,
                                                    cfg, limit, cpu)}
            for r, side in alternating(repeats):
                history, peak_mib = play[side]()
                kept = steady(history)
                rounds.append({"round": r, "side": side,
                               "images": sum(e["images"] for e in kept),
                               "seconds": round(sum(e["seconds"] for e in kept), 3),
                               "torch_threads": history[0]["torch_threads"],
                               "peak_pss_mib": peak_mib})
    finally:
        stop_ray(started)
    return summary(
        "train", rounds,
        {"data": cfg.data.path, "model": model, "image_size": image_size,
         "batch_size": batch_size, "epochs": epochs, "repeats": repeats, "limit": limit,
         "ray_worker_cpus": cfg.train.cpus_per_worker,
         "ray_worker_threads": cfg.train.threads_per_worker},
        {side: max(r["peak_pss_mib"] for r in rounds if r["side"] == side)
         for side in (CROSS, PLAIN)},
    )
