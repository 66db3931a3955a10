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
from crackray.data.shards import split_files

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


def _quiet_progress() -> None:
    """Training epochs re-run the pipeline every epoch; per-operator progress bars from every
    worker would bury the trial table, so they are off (Ray Data's own logs keep the detail)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False


def _read(files: list[str], with_masks: bool) -> ray.data.Dataset:
    _quiet_progress()
    columns = _COLUMNS + (_MASK_COLUMNS if with_masks else [])
    return ray.data.read_parquet(files, columns=columns)


def dataset_has_masks(files: list[str]) -> bool:
    return "mask" in pq.read_schema(files[0]).names


def positive_repeats(cfg: RunConfig, n_pos: int, n_neg: int) -> int:
    """How often each cracked training row appears per epoch (balanced sampling: about half
    of an epoch is cracks)."""
    if not cfg.data.balanced_sampling or not cfg.data.use_negatives:
        return 1
    return max(1, round(n_neg / max(n_pos, 1)))


def epoch_rows(cfg: RunConfig, n_pos: int, n_neg: int) -> int:
    """Training rows per epoch after negative filtering and oversampling."""
    negatives = n_neg if cfg.data.use_negatives else 0
    return negatives + n_pos * positive_repeats(cfg, n_pos, n_neg)


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
            "dilate": cfg.data.dilate,
            "segmented_fraction": cfg.data.segmented_fraction if train else 1.0,
        },
    )




def iterate_batches(
    shard, batch_size: int, device, *, shuffle: bool = False
) -> Iterator[dict]:
    """A worker's shard (DataIterator or Dataset) -> dicts of torch tensors on `device`.

    `image` is normalised float NCHW (channels_last memory), `label` float; string columns
    (`surface`, `path`) stay numpy arrays for per-surface metrics and error galleries.
    """
    import torch

    for batch in shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=4 * batch_size if shuffle else None,
        prefetch_batches=2,
    ):
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
