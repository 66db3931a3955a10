"""Ray Data ingest: Parquet shards -> decode + resize + augment (map_batches) -> Train workers.

Every worker builds its own part of each training epoch (`epochs.training_epoch`): the
epoch's rows in a fresh uniform random order that depends only on (train.seed, epoch), so that
a resumed run repeats it; `iterate_batches` turns it into model-ready torch batches.
Evaluation splits are small next to an epoch and each worker reads its own part of them in
process (`inference.split_batches`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback

from crackray.config import RunConfig
from crackray.data.batches import COLUMNS, MASK_COLUMNS, prepare_batch, to_torch
from crackray.data.shards import read_split_table

IDLE_STEP_SLEEP_S = 0.005
# The bounds of `block_rows`.
BLOCK_BYTES = 32 * 2**20
MIN_BLOCKS = 8
MIN_BLOCK_ROWS = 64


def block_rows(rows: int, image_size: int, *, with_masks: bool = False) -> int:
    """Rows a decode task takes from an epoch share of `rows` rows: one block, decoded by one
    `prepare_batch` call. Ray's cost per block (the task, the object store, the consumer's
    iterator threads) is paid per block, not per row: at 224 px, blocks of 64 rows cost all of
    Ray's processes 1.6-1.9 ms of CPU an image, blocks of 256 rows 1.4-1.6 ms (one process
    iterating an epoch, README "Performance"). So a block is as large as ~32 MiB of decoded
    pixels allows, but an epoch keeps at least 8 blocks, so that small epochs still decode in
    parallel tasks and their first batch comes early."""
    row_bytes = image_size * image_size * (4 if with_masks else 3)
    return max(MIN_BLOCK_ROWS, min(BLOCK_BYTES // row_bytes, math.ceil(rows / MIN_BLOCKS)))


class IdleStepBackoff(ExecutionCallback):
    """Ray Data's scheduling loop (a thread in the process that iterates the Dataset) waits for
    tasks only while none of them has output ready. Once decoded blocks wait for a slower
    consumer (output backpressure: a CPU training step takes longer than decoding its batch),
    the loop spins without waiting: ~3,000 steps a second that take a core and the GIL from
    the training loop beside it (Ray 2.60; a Train worker trained 36-44 images/s against
    58-60 with this callback, README "Performance"). After a step that changed nothing (no
    task dispatched or finished, no output read or taken), sleep briefly; a step that makes
    progress never waits."""

    def __init__(self):
        self._last = None

    def on_execution_step(self, executor) -> None:
        progress = tuple(
            (m.num_tasks_submitted, m.num_tasks_finished, m.num_task_outputs_generated,
             m.num_outputs_taken, m.num_external_outqueue_blocks)
            for m in (op.metrics for op in executor._topology)
        )
        if progress == self._last:
            time.sleep(IDLE_STEP_SLEEP_S)
        self._last = progress


def _configure_ray_data() -> None:
    """Settings every crackray Dataset carries (a Dataset keeps the DataContext it was built in).

    Training runs a pipeline every epoch; per-operator progress bars from every worker would
    bury the trial table, so they are off (Ray Data's own logs keep the detail).

    Ray Data's per-operator resource reservation sets aside half the CPUs, split evenly over
    the operators. Only decode needs much CPU here (reading and shuffling encoded bytes take
    milliseconds a block), so on a 2-CPU machine the reservation left one decode task running
    at a time: 0.65x a DataLoader's images/s with it, 0.94-0.98x without
    (`crackray bench ingest`, README "Performance").

    `IdleStepBackoff` keeps the scheduling loop from spinning while it holds outputs back.
    """
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.op_resource_reservation_enabled = False
    if IdleStepBackoff not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleStepBackoff)


def from_blocks(blocks: list[pa.Table]) -> ray.data.Dataset:
    """In-memory Arrow tables as a Ray Dataset of one block each, whose blocks leave in the
    order given, not in task completion order: the same rows in the same order every time."""
    _configure_ray_data()
    ds = ray.data.from_arrow(blocks)
    ds.context.execution_options.preserve_order = True
    return ds


def decoded(ds: ray.data.Dataset, cfg: RunConfig, *, train: bool, with_masks: bool):
    """`ds` decoded by `prepare_batch` (augmented, with dilated masks, if `train`), one call
    per block: the caller cuts the blocks (`block_rows`)."""
    return ds.map_batches(
        prepare_batch,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={
            "image_size": cfg.data.image_size,
            "augment_strength": cfg.data.augment if train else 0.0,
            "with_masks": with_masks,
            # Pixel metrics compare against the raw ground truth: dilate training masks only.
            "dilate": cfg.data.dilate if train else 1,
            "segmented_fraction": cfg.data.segmented_fraction if train else 1.0,
        },
    )


def overlay_examples(cfg: RunConfig, split: str, count: int = 6) -> dict[str, np.ndarray]:
    """A fixed handful of decoded rows with masks (two thirds cracks, spread over the split by
    path) whose predicted masks are drawn as MLflow artifacts during training."""
    table = read_split_table(cfg.data.path, split, columns=COLUMNS + MASK_COLUMNS)
    order = np.argsort(np.asarray(table.column("path").to_pylist(), dtype=object))
    labels = table.column("label").to_numpy()[order]
    positives, negatives = order[labels == 1], order[labels == 0]
    n_neg = min(len(negatives), count // 3)
    n_pos = min(len(positives), count - n_neg)
    picks = [
        part[np.linspace(0, len(part) - 1, n).round().astype(int)]
        for part, n in ((positives, n_pos), (negatives, n_neg))
        if n
    ]
    rows = table.take(np.concatenate(picks)).to_pydict()
    batch = {key: np.asarray(values, dtype=object) for key, values in rows.items()}
    batch["label"] = batch["label"].astype(np.int64)
    return prepare_batch(
        batch, image_size=cfg.data.image_size, augment_strength=0.0, with_masks=True, dilate=1
    )


def iterate_batches(shard, batch_size: int, device) -> Iterator[dict]:
    """A worker's shard (DataIterator or Dataset) -> dicts of torch tensors on `device`.

    `image` is normalised float NCHW (channels_last memory), `label` float; string columns
    (`surface`, `path`) stay numpy arrays for per-surface metrics and error galleries.
    """
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                    prefetch_batches=2):
        yield to_torch(batch, device)
