"""Ray Data ingest: Parquet shards -> decode + resize + augment (map_batches) -> Train workers.

The driver builds one Dataset per split; Ray Train hands each worker its shard
(`get_dataset_shard`), which `iterate_batches` turns into model-ready torch batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import ray.data
import ray.train

from crackray.config import RunConfig
from crackray.data import transforms
from crackray.data.shards import read_split_table, split_files

TRAIN, VAL, TEST = "train", "val", "test"
_COLUMNS = ["image", "label", "surface", "path", "sha256"]
_MASK_COLUMNS = ["mask", "has_mask"]
DECODE_BATCH = 64  # rows per map_batches call: large enough to amortise task overhead


def prepare_batch(
    batch: dict[str, np.ndarray],
    *,
    image_size: int,
    augment_strength: float,
    with_masks: bool = False,
    dilate: int = 1,
    segmented_fraction: float = 1.0,
) -> dict[str, np.ndarray]:
    """One map_batches step: decode, resize and (for training) augment a batch of rows."""
    images = transforms.decode_images(batch["image"], image_size)
    out = {
        "label": batch["label"].astype(np.float32),
        "surface": batch["surface"],
        "path": batch["path"],
    }
    masks = None
    if with_masks:
        masks, has_mask = transforms.decode_masks(batch["mask"], image_size, dilate)
        # Negatives have an all-zero mask by definition; positives keep theirs only for the
        # fully supervised fraction (mixed supervision).
        is_negative = out["label"] == 0
        keep = np.array(
            [transforms.weak_label_keep(h, segmented_fraction) for h in batch["sha256"]]
        )
        out["has_mask"] = is_negative | (has_mask & keep)
    rng = np.random.default_rng()
    images, masks = transforms.augment(images, rng, augment_strength, masks)
    out["image"] = images
    if with_masks:
        out["mask"] = masks
    return out


def _configure_ray_data() -> None:
    """Settings every crackray Dataset carries (a Dataset keeps the DataContext it was built in).

    Training epochs re-run the pipeline every epoch; per-operator progress bars from every
    worker would bury the trial table, so they are off (Ray Data's own logs keep the detail).

    Ray Data's per-operator resource reservation sets aside half the CPUs, split evenly over
    the read, block-shuffle and decode operators. Only decode needs CPU here (reading and
    shuffling block order take milliseconds), so on a 2-CPU machine the reservation left one
    decode task running at a time: 0.65x a DataLoader's images/s with it, 0.94-0.98x without
    (`crackray bench ingest`, README "Performance").
    """
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.op_resource_reservation_enabled = False


def _read(files: list[str], with_masks: bool) -> ray.data.Dataset:
    _configure_ray_data()
    columns = _COLUMNS + (_MASK_COLUMNS if with_masks else [])
    # Ray 2.60's DataSourceV2 Parquet reader lists files and reads footers in freshly started
    # actors on every execution, i.e. every epoch: 5-25 s of process start-up per epoch on a
    # small machine (`crackray bench ingest`). The V1 reader reads footers once, here.
    context = ray.data.DataContext.get_current()
    previous = getattr(context, "use_datasource_v2", False)
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(files, columns=columns)
    finally:
        context.use_datasource_v2 = previous


def dataset_has_masks(files: list[str]) -> bool:
    return "mask" in pq.read_schema(files[0]).names


def positive_repeats(cfg: RunConfig, n_pos: int, n_neg: int) -> int:
    """How often each cracked training row appears per epoch (balanced sampling: about half
    of an epoch is cracks)."""
    if not cfg.data.balanced_sampling or not cfg.data.use_negatives:
        return 1
    return max(1, round(n_neg / max(n_pos, 1)))


def epoch_rows(cfg: RunConfig, n_pos: int, n_neg: int) -> int:
    """Training rows per epoch after negative filtering, oversampling and (frequency
    sampling) drawing as many negatives as there are positives."""
    positives = n_pos * positive_repeats(cfg, n_pos, n_neg)
    negatives = n_neg if cfg.data.use_negatives else 0
    if cfg.data.frequency_sampling:
        negatives = min(negatives, positives)
    return negatives + positives


def build_dataset(
    cfg: RunConfig, split: str, *, with_masks: bool = False, positive_repeats: int = 1
) -> ray.data.Dataset:
    """The Ray Dataset of one split, decoded (and augmented if it is the training split)."""
    files = split_files(cfg.data.path, split)
    ds = _read(files, with_masks)
    train = split == TRAIN
    if train and (positive_repeats > 1 or not cfg.data.use_negatives):
        positives = ds.filter(expr="label == 1")
        parts = [positives] * positive_repeats
        if cfg.data.use_negatives:
            parts.append(ds.filter(expr="label == 0"))
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if train:
        ds = ds.randomize_block_order()
    return ds.map_batches(
        prepare_batch,
        batch_size=DECODE_BATCH,
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


def _filtered(batches: Iterator[dict], keep, batch_size: int) -> Iterator[dict]:
    """Rows where `keep(batch)` is True, re-cut into full batches, so that filtering does not
    leave many small ones (noisy BatchNorm statistics, wasted steps)."""
    pending: list[dict] = []
    held = 0
    for batch in batches:
        rows = keep(batch)
        if rows.any():
            pending.append({k: v[rows] for k, v in batch.items()})
            held += int(rows.sum())
        while held >= batch_size:
            merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in merged.items()}
            pending, held = [{k: v[batch_size:] for k, v in merged.items()}], held - batch_size
    if held:
        yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}


def overlay_examples(cfg: RunConfig, split: str, count: int = 6) -> dict[str, np.ndarray]:
    """A fixed handful of decoded rows with masks (two thirds cracks, spread over the split by
    path) whose predicted masks are drawn as MLflow artifacts during training."""
    table = read_split_table(cfg.data.path, split, columns=_COLUMNS + _MASK_COLUMNS)
    order = np.argsort(np.asarray(table.column("path").to_pylist(), dtype=object))
    labels = table.column("label").to_numpy()[order]
    positives, negatives = order[labels == 1], order[labels == 0]
    n_neg = min(len(negatives), count // 3)
    n_pos = min(len(positives), count - n_neg)
    picks = [part[np.linspace(0, len(part) - 1, n).round().astype(int)]
             for part, n in ((positives, n_pos), (negatives, n_neg)) if n]
    rows = table.take(np.concatenate(picks)).to_pydict()
    batch = {key: np.asarray(values, dtype=object) for key, values in rows.items()}
    batch["label"] = batch["label"].astype(np.int64)
    return prepare_batch(batch, image_size=cfg.data.image_size, augment_strength=0.0,
                         with_masks=True, dilate=1)


def iterate_batches(
    shard, batch_size: int, device, *, shuffle: bool = False, keep=None
) -> Iterator[dict]:
    """A worker's shard (DataIterator or Dataset) -> dicts of torch tensors on `device`.

    `image` is normalised float NCHW (channels_last memory), `label` float; string columns
    (`surface`, `path`) stay numpy arrays for per-surface metrics and error galleries.
    `keep(numpy batch) -> bool rows` drops rows after decoding (frequency sampling).
    """
    import torch

    batches = shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=4 * batch_size if shuffle else None,
        prefetch_batches=2,
    )
    if keep is not None:
        batches = _filtered(batches, keep, batch_size)
    for batch in batches:
        out = {
            "image": transforms.to_model_input(batch["image"], device),
            "label": torch.tensor(batch["label"], device=device),
            "surface": batch["surface"],
            "path": batch["path"],
        }
        if "mask" in batch:
            out["mask"] = torch.tensor(batch["mask"], device=device)
            out["has_mask"] = torch.tensor(batch["has_mask"], device=device)
        yield out


class ExactEvalDataConfig(ray.train.DataConfig):
    """Split training data equally (DDP needs the same number of steps on every worker) but
    evaluation data with `equal=False`, so that every validation / test row is seen by exactly
    one worker: no row dropped to even out the shards, none padded in twice."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            splits = ds.streaming_split(world_size, equal=(name == TRAIN))
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output
