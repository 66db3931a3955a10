"""Evaluate a model on a whole prepared split in this process: no Ray, no training code.

`select`, `report` and the end-of-run test pass use it. The split is streamed from its
Parquet shards one row group at a time, so memory stays bounded by a batch whatever the
split's size, and a small evaluation does not pay Ray's start-up (about 5 s).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from crackray.config import RunConfig
from crackray.data.pipeline import prepare_batch
from crackray.data.shards import read_manifest, split_files
from crackray.data.transforms import to_model_input
from crackray.engine import EvalOutputs, Objective, evaluate
from crackray.models import model_segments

_COLUMNS = ["image", "label", "surface", "path", "sha256"]
_MASK_COLUMNS = ["mask", "has_mask"]


def split_batches(cfg: RunConfig, split: str, batch_size: int, device: torch.device,
                  with_masks: bool = False) -> Iterator[dict]:
    """A split's rows in their stored order, decoded like the Ray pipeline's evaluation
    batches (no augmentation), as torch batches on `device`."""
    if read_manifest(cfg.data.path)["totals"].get(split, {}).get("samples", 0) == 0:
        return
    columns = _COLUMNS + (_MASK_COLUMNS if with_masks else [])
    for path in split_files(cfg.data.path, split):
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size, columns=columns):
            rows = {name: record_batch.column(name).to_numpy(zero_copy_only=False)
                    for name in columns}
            batch = prepare_batch(rows, image_size=cfg.data.image_size, augment_strength=0.0,
                                  with_masks=with_masks)
            out = {
                "image": to_model_input(batch["image"], device),
                "label": torch.tensor(batch["label"], device=device),
                "surface": np.asarray(batch["surface"], dtype=object),
                "path": np.asarray(batch["path"], dtype=object),
            }
            if with_masks:
                out["mask"] = torch.tensor(batch["mask"], device=device)
                out["has_mask"] = torch.tensor(batch["has_mask"], device=device)
            yield out


def predict_split(model: torch.nn.Module, cfg: RunConfig, split: str,
                  device: torch.device | None = None) -> EvalOutputs:
    """Every row of `split` predicted once by `model` (test, select, report)."""
    device = device or torch.device("cpu")
    segments = model_segments(cfg.model.name)
    objective = Objective(cfg, 1.0, segments)
    batches = split_batches(cfg, split, cfg.train.eval_batch_size, device, with_masks=segments)
    return evaluate(model.to(device), batches, objective, device=device, keep_seg_maps=segments)
