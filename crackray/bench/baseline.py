"""The plain-PyTorch side: a map-style Dataset and DataLoader as a careful script would write
them, calling the same decode and augmentation function as crackray's Ray Data step."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from crackray.data.batches import prepare_batch, to_torch
from crackray.data.shards import read_split_table


class ShardDataset(Dataset):
    """A map-style Dataset over one split: encoded bytes in memory, decoded and augmented a
    batch of indices at a time (use with a BatchSampler) by `batches.prepare_batch`, the very
    function of crackray's map_batches step, so both sides produce the same pixels."""

    def __init__(self, data_dir: str | Path, split: str, image_size: int,
                 augment_strength: float, limit: int | None = None):
        table = read_split_table(data_dir, split, ["image", "label", "surface", "path"])
        if limit is not None:
            table = table.slice(0, limit)
        self.images = np.asarray(table.column("image").to_pylist(), dtype=object)
        self.labels = table.column("label").to_numpy()
        self.surfaces = table.column("surface").to_numpy(zero_copy_only=False)
        self.paths = table.column("path").to_numpy(zero_copy_only=False)
        self.image_size, self.augment_strength = image_size, augment_strength

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> dict[str, np.ndarray]:
        rows = {"image": self.images[indices], "label": self.labels[indices],
                "surface": self.surfaces[indices], "path": self.paths[indices]}
        return prepare_batch(rows, image_size=self.image_size,
                             augment_strength=self.augment_strength)


def plain_loader(dataset: ShardDataset, batch_size: int, workers: int,
                 shuffle: bool = True) -> DataLoader:
    """A DataLoader as a careful hand-written script would set it up: batched fetches,
    persistent worker processes, default prefetching."""
    order = RandomSampler(dataset) if shuffle else range(len(dataset))
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False),
                      batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def plain_batches(loader: Iterable[dict], device: torch.device) -> Iterator[dict]:
    """The loader's batches as trainers consume them: `batches.to_torch`, as `iterate_batches`
    does."""
    for batch in loader:
        yield to_torch(batch, device)
