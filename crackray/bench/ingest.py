"""`crackray bench ingest`: images/s of the Ray Data training pipeline against a DataLoader
with as many worker processes as Ray has CPUs, and both against the machine's ceilings."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from crackray.bench.baseline import ShardDataset, plain_batches, plain_loader
from crackray.bench.common import (
    CROSS,
    PLAIN,
    alternating,
    bench_config,
    ceilings,
    cores,
    drain,
    rate,
    start_ray,
    stop_ray,
    summary,
)
from crackray.bench.memory import PeakMemory, cpu_seconds, cpu_used, dataloader_workers, ray_side


def bench_ingest(data: str | Path, *, batch_size: int = 32, image_size: int = 224,
                 repeats: int = 3, limit: int | None = None) -> dict:
    """Alternating epochs, `repeats` per side, after one warm-up epoch each; then one untimed
    epoch per side for peak memory."""
    from crackray.data.epochs import training_epoch
    from crackray.data.pipeline import iterate_batches
    from crackray.data.splits import TRAIN

    cfg = bench_config(data, image_size=image_size, batch_size=batch_size)
    limits = ceilings(cfg.data.path, image_size, cfg.data.augment, batch_size=batch_size)
    workers = cores()
    started = start_ray()
    try:
        dataset = training_epoch(cfg, 0)  # what a worker trains on: shuffled, decoded
        if limit is not None:
            dataset = dataset.limit(limit)
        loader = plain_loader(ShardDataset(cfg.data.path, TRAIN, image_size, cfg.data.augment,
                                           limit), batch_size, workers)
        cpu = torch.device("cpu")
        sides = {
            CROSS: (lambda: iterate_batches(dataset, batch_size, cpu), ray_side),
            PLAIN: (lambda: plain_batches(loader, cpu), dataloader_workers),
        }
        for batches, _ in sides.values():  # warm-up epoch: worker processes start, imports load
            drain(batches())
        rounds = []
        for r, side in alternating(repeats):
            batches, processes = sides[side]
            cpu_before, start = cpu_seconds(processes()), time.perf_counter()
            images = drain(batches())
            seconds = time.perf_counter() - start
            rounds.append({"round": r, "side": side, "images": images,
                           "seconds": round(seconds, 3),
                           "cpu_seconds": round(cpu_used(cpu_before,
                                                         cpu_seconds(processes())), 3)})
        # Memory in one more, untimed epoch per side: reading PSS of Ray's ~15 processes every
        # 0.25 s costs the driver CPU, which slowed the timed Ray epochs by ~15 %.
        peak_mib = {}
        for side, (batches, processes) in sides.items():
            with PeakMemory(processes) as memory:
                drain(batches())
            peak_mib[side] = round(memory.peak_mib, 1)
    finally:
        stop_ray(started)
    cross = rate(rounds, CROSS)
    return summary(
        "ingest", rounds,
        {"data": cfg.data.path, "image_size": image_size, "batch_size": batch_size,
         "repeats": repeats, "workers": workers, "limit": limit},
        peak_mib,
        **limits,
        **{f"crackray_share_of_{key.removesuffix('_images_per_s')}": round(cross / limit, 3)
           for key, limit in limits.items() if key.endswith("_limit_images_per_s")},
        # Images per CPU-second of all of a side's processes: what each side costs, whatever
        # else the shared machine runs meanwhile (wall-clock rates move with the load).
        **{f"{side}_images_per_cpu_s": round(_per_cpu_second(rounds, side), 1)
           for side in (CROSS, PLAIN)},
    )


def _per_cpu_second(rounds: list[dict], side: str) -> float:
    mine = [r for r in rounds if r["side"] == side]
    return sum(r["images"] for r in mine) / max(sum(r["cpu_seconds"] for r in mine), 1e-9)
