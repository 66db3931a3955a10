"""`crackray bench ingest`: images/s of the Ray Data training pipeline against a DataLoader
with as many worker processes as Ray has CPUs, and both against the machine's ceilings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from crackray.bench.baseline import ShardDataset, plain_batches, plain_loader
from crackray.bench.common import (
    CROSS,
    PLAIN,
    Ceilings,
    alternating,
    bench_config,
    cores,
    drain,
    in_fresh_process,
    rate,
    start_ray,
    stop_ray,
    summary,
)
from crackray.bench.memory import PeakMemory, cpu_seconds, cpu_used, dataloader_workers, ray_side
from crackray.config import RunConfig

# The processes whose CPU and memory count for a side.
PROCESSES = {CROSS: ray_side, PLAIN: dataloader_workers}


def bench_ingest(data: str | Path, *, batch_size: int = 32, image_size: int = 224,
                 repeats: int = 3, limit: int | None = None) -> dict:
    """Alternating epochs, `repeats` per side, after one warm-up epoch each, with a pass of
    every ceiling after each (`common.Ceilings`); then each side's peak memory
    over an epoch in a fresh process of its own."""
    cfg = bench_config(data, image_size=image_size, batch_size=batch_size)
    ceiling = Ceilings(cfg.data.path, image_size, cfg.data.augment, batch_size=batch_size)
    started = start_ray()
    try:
        sides = {side: _epochs(side, cfg, limit) for side in (CROSS, PLAIN)}
        for batches in sides.values():  # warm-up epoch: worker processes start, imports load
            drain(batches())
        rounds = []
        for r, side in alternating(repeats):
            processes = PROCESSES[side]
            cpu_before, start = cpu_seconds(processes()), time.perf_counter()
            images = drain(sides[side]())
            seconds = time.perf_counter() - start
            rounds.append({"round": r, "side": side, "images": images,
                           "seconds": round(seconds, 3),
                           "cpu_seconds": round(cpu_used(cpu_before,
                                                         cpu_seconds(processes())), 3)})
            ceiling.measure()
    finally:
        stop_ray(started)
    peak_mib = {side: in_fresh_process(peak_memory, side, cfg, limit) for side in (CROSS, PLAIN)}
    cross, limits = rate(rounds, CROSS), ceiling.figures()
    return summary(
        "ingest", rounds,
        {"data": cfg.data.path, "image_size": image_size, "batch_size": batch_size,
         "repeats": repeats, "workers": cores(), "limit": limit},
        peak_mib,
        **limits,
        **{f"crackray_share_of_{key.removesuffix('_images_per_s')}": round(cross / limit, 3)
           for key, limit in limits.items() if key.endswith("_limit_images_per_s")},
        # Images per CPU-second of all of a side's processes: what each side costs, whatever
        # else the shared machine runs meanwhile (wall-clock rates move with the load).
        **{f"{side}_images_per_cpu_s": round(_per_cpu_second(rounds, side), 1)
           for side in (CROSS, PLAIN)},
    )


def peak_memory(side: str, cfg: RunConfig, limit: int | None) -> float:
    """Peak summed PSS (MiB) of `side`'s processes over one epoch after a warm-up one, in the
    calling process: meant for a fresh one (`common.in_fresh_process`), so that neither side's
    figure carries what the other side or the ceilings left behind. Untimed, because polling
    ~15 Ray processes every 0.25 s costs the driver CPU (~15 % of a timed Ray epoch)."""
    started = start_ray() if side == CROSS else False
    try:
        batches = _epochs(side, cfg, limit)
        drain(batches())
        with PeakMemory(PROCESSES[side]) as memory:
            drain(batches())
    finally:
        stop_ray(started)
    return round(memory.peak_mib, 1)


def _epochs(side: str, cfg: RunConfig, limit: int | None) -> Callable[[], Iterator[dict]]:
    """A side's training epoch of CPU batches, again at every call: for crackray what a Train
    worker trains on (shuffled, decoded by Ray Data), for the baseline a DataLoader with as
    many worker processes as there are cores."""
    cpu = torch.device("cpu")
    if side == CROSS:
        from crackray.data.epochs import training_epoch
        from crackray.data.pipeline import iterate_batches

        dataset = training_epoch(cfg, 0)
        if limit is not None:
            dataset = dataset.limit(limit)
        return lambda: iterate_batches(dataset, cfg.train.batch_size, cpu)
    from crackray.data.splits import TRAIN

    loader = plain_loader(ShardDataset(cfg.data.path, TRAIN, cfg.data.image_size,
                                       cfg.data.augment, limit), cfg.train.batch_size, cores())
    return lambda: plain_batches(loader, cpu)


def _per_cpu_second(rounds: list[dict], side: str) -> float:
    mine = [r for r in rounds if r["side"] == side]
    return sum(r["images"] for r in mine) / max(sum(r["cpu_seconds"] for r in mine), 1e-9)
