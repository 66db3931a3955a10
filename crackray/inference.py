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
from crackray.data.images import decode_mask, open_image
from crackray.data.shards import read_manifest, split_files
from crackray.data.transforms import decode_images, decode_masks, to_model_input
from crackray.engine import EvalOutputs, Objective, evaluate
from crackray.models import model_segments

_COLUMNS = ["image", "label", "surface", "path", "sha256"]
_MASK_COLUMNS = ["mask", "has_mask"]


def split_batches(cfg: RunConfig, split: str, batch_size: int, device: torch.device,
                  with_masks: bool = False) -> Iterator[dict]:
    """A split's rows in their stored order, decoded like the Ray pipeline's evaluation
    batches (no augmentation), as torch batches on `device`. Decoded here with the same
    transforms, not through `pipeline.prepare_batch`: importing the pipeline imports Ray."""
    if read_manifest(cfg.data.path)["totals"].get(split, {}).get("samples", 0) == 0:
        return
    columns = _COLUMNS + (_MASK_COLUMNS if with_masks else [])
    for path in split_files(cfg.data.path, split):
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size, columns=columns):
            rows = {name: record_batch.column(name).to_numpy(zero_copy_only=False)
                    for name in columns}
            labels = rows["label"].astype(np.float32)
            out = {
                "image": to_model_input(decode_images(rows["image"], cfg.data.image_size), device),
                "label": torch.tensor(labels, device=device),
                "surface": np.asarray(rows["surface"], dtype=object),
                "path": np.asarray(rows["path"], dtype=object),
            }
            if with_masks:
                masks, has_mask = decode_masks(rows["mask"], cfg.data.image_size)
                out["mask"] = torch.tensor(masks, device=device)
                # A crack-free row's mask is all zero by definition, stored or not (as in the
                # pipeline's evaluation batches: every mask kept, none dilated).
                out["has_mask"] = torch.tensor(has_mask | (labels == 0), device=device)
                # The loss needs `mask` at the training size; pixel metrics are scored on the
                # stored masks at their own resolution (`engine.evaluate` upsamples the maps).
                out["score_masks"] = full_resolution_masks(rows["mask"], rows["image"])
            yield out


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
