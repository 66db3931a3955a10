"""What the benchmarks share: run configs, the per-process ceilings, Ray start-up, alternating
rounds and the summary of a side-by-side comparison."""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from crackray.config import RunConfig
from crackray.data import transforms
from crackray.data.images import decode_rgb, open_image, resized_rgb
from crackray.data.shards import read_split_table, verify_dataset

CROSS = "crackray"
PLAIN = "baseline"
QUICKSTART = Path(__file__).resolve().parents[2] / "search_spaces" / "quickstart.yaml"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def bench_config(data: str | Path, *, image_size: int, batch_size: int, model: str = "simple_cnn",
                 epochs: int = 1, cpus_per_worker: float = 1.0,
                 threads_per_worker: int | None = None) -> RunConfig:
    """A run config for benchmarking the shards at `data` (checked against their manifest)."""
    path = Path(data).expanduser().resolve()
    verify_dataset(path)
    return RunConfig.model_validate({
        "data": {"path": str(path), "image_size": image_size},
        "model": {"name": model},
        "train": {"epochs": epochs, "workers": 1, "batch_size": batch_size,
                  "cpus_per_worker": cpus_per_worker, "threads_per_worker": threads_per_worker},
    })


def _decode_only(data: bytes, size: int) -> np.ndarray:
    """The decode half of the training transform: a random-cropped tile where
    `transforms.decode_training` crops (the window's position costs nothing), else the resize."""
    with open_image(data) as image:
        if transforms.crops(image.size, size):
            tile = image.crop(transforms.crop_box(image.size, size, np.zeros(2)))
        else:
            tile = resized_rgb(image, size)
        return np.asarray(tile if tile.mode == "RGB" else tile.convert("RGB"))


class Ceilings:
    """One process's images per CPU-second of (a) `decode_resize`: decoding tiles and resizing
    them to `image_size`, what evaluation runs and what training ran before it cropped (the
    classic decode-and-resize ceiling of an image pipeline); (b) `decode`: the training path's
    own decode (`_decode_only`); (c) `transform`: what the pipeline's decode tasks run per
    block (`batches.prepare_batch`: decode, crop, turns, the jitter drawn); and, given the
    consumer's `batch_size`, (d) `model_input`: that plus the consumer's `to_torch` (the
    colour jitter, normalisation) on the CPU, all the work between encoded bytes and a
    model-ready batch. Times the cores, each is a ceiling of any ingest on this machine, (d) of
    one whose consumer shares its cores.

    CPU time, unlike the wall clock, leaves out the moments the shared machine gave the core
    to someone else. Even so one process's CPU-second buys 0.7-1.3x the decoding from one
    second to the next here (passes of 0.25 s, nothing else running), so a benchmark measures
    a pass of each between its timed rounds (`measure`) and a ceiling is all its passes'
    images over all their CPU time: the same mixture of the machine's fast and slow moments
    as the rounds it is compared with. (Against the best of three passes measured before the
    rounds, five `bench ingest` runs put the Ray pipeline at 78-117 % of the decode + resize
    ceiling, the ceiling itself moving from 1,448 to 2,093 images/s.)"""

    def __init__(self, data: str | Path, image_size: int, augment: float, sample: int = 256,
                 batch_size: int | None = None):
        from crackray.data.batches import prepare_batch, to_torch
        from crackray.data.pipeline import block_rows

        table = read_split_table(data, "train", ["image", "label", "surface", "path"])
        size = block_rows(table.num_rows, image_size)  # a one-worker epoch's blocks, repeats aside
        table = table.slice(0, sample)
        rows = {name: table.column(name).to_numpy(zero_copy_only=False)
                for name in table.column_names}
        indices = list(range(table.num_rows))

        def decoded_blocks() -> Iterator[dict]:
            for start in range(0, len(indices), size):
                part = indices[start:start + size]
                yield prepare_batch({k: v[part] for k, v in rows.items()},
                                    image_size=image_size, augment_strength=augment)

        def transform() -> None:
            for _ in decoded_blocks():
                pass

        def model_inputs() -> None:
            for block in decoded_blocks():
                for first in range(0, len(block["label"]), batch_size):
                    to_torch({k: v[first:first + batch_size] for k, v in block.items()}, None)

        images = list(rows["image"])
        self._work: dict[str, Callable[[], object]] = {
            "decode_resize": lambda: [decode_rgb(d, image_size) for d in images],
            "decode": lambda: [_decode_only(d, image_size) for d in images],
            "transform": transform,
        }
        if batch_size is not None:
            self._work["model_input"] = model_inputs
        self._images_per_pass = len(indices)
        self._cpu_seconds = dict.fromkeys(self._work, 0.0)
        self._passes = 0
        for work in self._work.values():  # warm Pillow's codecs and torch's kernels, untimed
            work()

    def measure(self, passes: int = 1) -> Ceilings:
        for _ in range(passes):
            for name, work in self._work.items():
                start = time.process_time()
                work()
                self._cpu_seconds[name] += time.process_time() - start
            self._passes += 1
        return self

    def figures(self) -> dict:
        """`<name>_images_per_s_one_process` and `<name>_limit_images_per_s` (times the cores)
        of every ceiling, over the passes measured so far."""
        n = cores()
        out = {}
        for name, seconds in self._cpu_seconds.items():
            rate = self._images_per_pass * self._passes / max(seconds, 1e-9)
            out[f"{name}_images_per_s_one_process"] = round(rate, 1)
            out[f"{name}_limit_images_per_s"] = round(rate * n, 1)
        return out


def ceilings(data: str | Path, image_size: int, augment: float, sample: int = 256,
             batch_size: int | None = None, passes: int = 3) -> dict:
    """`Ceilings.figures` over `passes` passes measured now, one after another."""
    return Ceilings(data, image_size, augment, sample, batch_size).measure(passes).figures()


def in_fresh_process(function: Callable, *args):
    """`function(*args)` in a new Python process (spawned: nothing inherited but the
    environment), its result returned: a benchmark side's memory then carries nothing that
    the other side or the ceilings left in this process."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def drain(batches: Iterable[dict]) -> int:
    return sum(len(batch["label"]) for batch in batches)


def start_ray() -> bool:
    """Start Ray as crackray's commands do (`runtime.ensure_ray`: a local Ray of our own,
    Train's settings) unless one is connected; True if we started it."""
    import ray
    import ray.data

    from crackray.runtime import ensure_ray

    if ray.is_initialized():
        return False
    ensure_ray()
    # Progress bars redraw from the consuming process; a benchmark wants no terminal chatter.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True


def stop_ray(started: bool) -> None:
    import ray

    if started:
        ray.shutdown()


def alternating(rounds: int) -> Iterator[tuple[int, str]]:
    """A B, B A, A B, ...: neither side always runs first (warm caches, drifting load)."""
    for r in range(rounds):
        for side in ((CROSS, PLAIN) if r % 2 == 0 else (PLAIN, CROSS)):
            yield r, side


def rate(rounds: list[dict], side: str) -> float:
    """A side's images/s over all its rounds: total images over total seconds."""
    mine = [r for r in rounds if r["side"] == side]
    return sum(r["images"] for r in mine) / max(sum(r["seconds"] for r in mine), 1e-9)


def steady(history: list[dict]) -> list[dict]:
    """Epochs after the first (which pays worker start-up and imports), if there are any."""
    return history[1:] if len(history) > 1 else history


def summary(benchmark: str, rounds: list[dict], settings: dict, peak_mib: dict[str, float],
            **extra) -> dict:
    cross, plain = rate(rounds, CROSS), rate(rounds, PLAIN)
    return {
        "benchmark": benchmark,
        "crackray_images_per_s": round(cross, 2),
        "baseline_images_per_s": round(plain, 2),
        "ratio": round(cross / plain, 3) if plain > 0 else math.nan,
        "crackray_peak_pss_mib": round(peak_mib[CROSS], 1),
        "baseline_peak_pss_mib": round(peak_mib[PLAIN], 1),
        **extra,
        "settings": {**settings, "cores": cores(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "rounds": rounds,
    }


def training_parts(cfg: RunConfig, device: torch.device):
    """Model, objective and optimizer, identical (same seed) on both sides."""
    from crackray.engine import Objective
    from crackray.models import create_model
    from crackray.optim import build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, pretrained=False, dropout=cfg.model.dropout,
                         image_size=cfg.data.image_size).to(device)
    objective = Objective(cfg, 1.0, segmentation=False)
    return model, objective, build_optimizer(model, cfg.optim)
