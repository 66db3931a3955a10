"""Evaluate a model on a whole prepared split in this process: no Ray, no training code.

`select`, `report`, the end-of-run test pass, and every Train worker's per-epoch validation
(each on its own part of the split) use it. The split is streamed from its Parquet shards one
row group at a time, so memory stays bounded by a row group of encoded tiles and a decoded
batch whatever the split's size (plus, for segmenting models, each image's map and mask at the
mask's full resolution, which the pixel metrics are scored at). A small evaluation then pays
neither Ray's start-up (about 5 s) nor, in a trial, a Ray Data split coordinator and an
executor per epoch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from crackray.config import RunConfig
from crackray.data.batches import COLUMNS, MASK_COLUMNS, prepare_batch, to_torch
from crackray.data.images import decode_mask, open_image
from crackray.data.shards import read_manifest, split_files
from crackray.engine import EvalOutputs, Objective, evaluate
from crackray.models import model_segments


def split_batches(cfg: RunConfig, split: str, batch_size: int, device: torch.device,
                  with_masks: bool = False, *, rank: int = 0,
                  world_size: int = 1) -> Iterator[dict]:
    """A split's rows in their stored order, decoded as the Ray pipeline's evaluation
    batches are (`batches.prepare_batch`, no augmentation), as torch batches on `device`.

    With `world_size` > 1, only part `rank` of the split: the parts are contiguous runs of
    rows in stored order, within one row of each other in size, disjoint and covering the
    split, so Train workers that each score their own part score every row exactly once.
    Each worker reads only the row groups its part touches."""
    total = read_manifest(cfg.data.path)["totals"].get(split, {}).get("samples", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    low, high = total * rank // world_size, total * (rank + 1) // world_size
    columns = COLUMNS + (MASK_COLUMNS if with_masks else [])
    offset = 0  # rows of the split before the current row group
    for path in split_files(cfg.data.path, split) if high > low else []:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            rows_in_group = parquet.metadata.row_group(group).num_rows
            start, stop = max(low - offset, 0), min(high - offset, rows_in_group)
            offset += rows_in_group
            if start >= stop:
                continue
            part = parquet.read_row_group(group, columns=columns).slice(start, stop - start)
            for record_batch in part.to_batches(max_chunksize=batch_size):
                yield _decoded_batch(record_batch, cfg, columns, with_masks, device)


def _decoded_batch(record_batch, cfg: RunConfig, columns: list[str], with_masks: bool,
                   device: torch.device) -> dict:
    rows = {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in columns}
    batch = to_torch(prepare_batch(rows, image_size=cfg.data.image_size, augment_strength=0.0,
                                   with_masks=with_masks), device)
    if with_masks:
        # The loss needs `mask` at the training size; pixel metrics are scored on the stored
        # masks at their own resolution (`engine.evaluate` upsamples the maps).
        batch["score_masks"] = full_resolution_masks(rows["mask"], rows["image"])
    return batch


def full_resolution_masks(masks, images) -> list[np.ndarray]:
    """Stored masks decoded at their own size (uint8 0/1); a row without a mask is crack-free
    by definition, an all-zero mask of its image's size."""
    out = []
    for mask, image in zip(masks, images, strict=True):
        if mask is not None:
            out.append(decode_mask(mask))
            continue
        with open_image(image) as header:  # reads the size only
            width, height = header.size
        out.append(np.zeros((height, width), dtype=np.uint8))
    return out


def predict_split(model: torch.nn.Module, cfg: RunConfig, split: str,
                  device: torch.device | None = None) -> EvalOutputs:
    """Every row of `split` predicted once by `model` (test, select, report)."""
    device = device or torch.device("cpu")
    segments = model_segments(cfg.model.name)
    objective = Objective(cfg, 1.0, segments)
    batches = split_batches(cfg, split, cfg.train.eval_batch_size, device, with_masks=segments)
    return evaluate(model.to(device), batches, objective, device=device, keep_seg_maps=segments)
