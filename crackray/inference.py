"""Evaluate a model on a whole prepared split in this process: no Ray, no training code.

`select`, `report` and the end-of-run test pass use it. The split is streamed from its
Parquet shards one row group at a time, so memory stays bounded by a batch whatever the
split's size (plus, for segmenting models, each image's map and mask at the mask's full
resolution, which the pixel metrics are scored at), and a small evaluation does not pay
Ray's start-up (about 5 s).
"""

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
                  with_masks: bool = False) -> Iterator[dict]:
    """A split's rows in their stored order, decoded as the Ray pipeline's evaluation
    batches are (`batches.prepare_batch`, no augmentation), as torch batches on `device`."""
    if read_manifest(cfg.data.path)["totals"].get(split, {}).get("samples", 0) == 0:
        return
    columns = COLUMNS + (MASK_COLUMNS if with_masks else [])
    for path in split_files(cfg.data.path, split):
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size, columns=columns):
            rows = {name: record_batch.column(name).to_numpy(zero_copy_only=False)
                    for name in columns}
            batch = to_torch(prepare_batch(rows, image_size=cfg.data.image_size,
                                           augment_strength=0.0, with_masks=with_masks),
                             device)
            if with_masks:
                # The loss needs `mask` at the training size; pixel metrics are scored on the
                # stored masks at their own resolution (`engine.evaluate` upsamples the maps).
                batch["score_masks"] = full_resolution_masks(rows["mask"], rows["image"])
            yield batch


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
