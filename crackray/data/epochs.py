"""Training epochs on Ray Data: every worker builds its own share of each epoch, in a fresh
uniform random order that depends only on (train.seed, epoch), so a resumed run repeats it."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from crackray.config import RunConfig
from crackray.data.batches import COLUMNS, MASK_COLUMNS
from crackray.data.composition import positive_repeats
from crackray.data.pipeline import block_rows, decoded, from_blocks
from crackray.data.shards import read_split_table, split_files
from crackray.data.splits import TRAIN
from crackray.sampling import frequency_sampler


def training_epoch(
    cfg: RunConfig, epoch: int, *, rank: int = 0, world_size: int = 1, with_masks: bool = False
) -> ray.data.Dataset:
    """The rows worker `rank` of `world_size` trains on in `epoch`, in training order, decoded
    and augmented: a Dataset each worker builds and iterates itself, every epoch.

    The epoch holds every crack row `positive_repeats` times (balanced sampling), and the
    crack-free rows: all, the frequency sampler's draw for the epoch, or none without
    `use_negatives` (`composition.epoch_composition` counts the same rows). Each row (and
    repeat) gets a key, a keyed hash of its path, repeat index, `train.seed` and the epoch;
    sorted by key the epoch is in a fresh uniform random order, and worker r takes the r-th of
    `world_size` equal runs of it (the remainder dropped, so every worker takes the same number
    of steps). The key also seeds the row's augmentation. Everything is a function of
    (train.seed, epoch, rank, world size): epoch e visits the same rows in the same order
    whenever it runs, resumed or not.

    The worker reads the encoded rows of its run itself (a row group at a time, ~10 KB a tile,
    keeping only its own), puts them in key order into Ray's object store in blocks of
    `pipeline.block_rows`, and Ray Data decodes and augments those blocks in parallel tasks, in
    order.
    Why not one Dataset that Ray Train splits: `prepare` writes splits sorted by path, so the
    order must change globally every epoch, and Ray Data's per-execution reseeding counts
    executions in the process that runs them (after a restart epoch k would get epoch 0's
    order); a split also costs a coordinator actor per epoch. Why not Ray Data's
    `random_shuffle` of read blocks: four stages (read, select, shuffle map and reduce) to
    start every epoch, against one here (`crackray bench trial`, README "Performance").
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    table = read_split_table(cfg.data.path, TRAIN, columns=["path", "label"])
    paths = np.asarray(table.column("path").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy()
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    sampler = frequency_sampler(cfg)  # None unless data.frequency_sampling
    index, copies = _epoch_index(
        labels,
        paths,
        repeats=positive_repeats(cfg, n_pos, n_neg),
        negatives=cfg.data.use_negatives,
        selected=sampler.selections(epoch + 1)[epoch] if sampler else None,
    )
    keys = _row_keys(paths[index], copies, cfg.train.seed, epoch)
    if len(np.unique(keys)) < len(keys):  # 63-bit keys: ~1e-8 odds at a million rows
        raise RuntimeError(f"two training rows share an order key in epoch {epoch}: reseed")
    share = len(keys) // world_size
    if share == 0:
        raise ValueError(
            f"epoch {epoch} has {len(keys)} training rows, fewer than {world_size} workers"
        )
    mine = np.argsort(keys, kind="stable")[rank * share:(rank + 1) * share]  # in key order
    rows = _read_rows(cfg.data.path, index[mine], with_masks).append_column(
        "key", pa.array(keys[mine]))
    size = block_rows(len(rows), cfg.data.image_size, with_masks=with_masks)
    blocks = [rows.slice(start, size) for start in range(0, len(rows), size)]
    return decoded(from_blocks(blocks), cfg, train=True, with_masks=with_masks)


def _read_rows(data_path: str, rows: np.ndarray, with_masks: bool) -> pa.Table:
    """Rows of the training split by position (repeats allowed), in the order given, read a
    row group at a time so that memory holds only the rows kept."""
    columns = COLUMNS + (MASK_COLUMNS if with_masks else [])
    wanted = np.sort(np.unique(rows))
    parts, offset = [], 0
    for path in split_files(data_path, TRAIN):
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            here = wanted[(wanted >= offset) & (wanted < offset + size)]
            if len(here):
                table = parquet.read_row_group(group, columns=columns)
                parts.append(table.take(pa.array(here - offset)))
            offset += size
    return pa.concat_tables(parts).take(pa.array(np.searchsorted(wanted, rows)))


def _epoch_index(
    labels: np.ndarray,
    paths: np.ndarray,
    *,
    repeats: int,
    negatives: bool,
    selected: frozenset[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of an epoch among `labels` / `paths`: (row index, repeat index) per epoch row;
    each crack row `repeats` times, then the crack-free rows kept."""
    positive = np.flatnonzero(labels == 1)
    negative = np.flatnonzero(labels == 0) if negatives else np.zeros(0, dtype=np.int64)
    if selected is not None:
        negative = negative[
            np.fromiter((paths[i] in selected for i in negative), bool, len(negative))
        ]
    index = np.concatenate([np.tile(positive, repeats), negative])
    copies = np.concatenate(
        [np.repeat(np.arange(repeats), len(positive)), np.zeros(len(negative), dtype=np.int64)]
    )
    return index, copies


def _row_keys(paths, copies, seed: int, epoch: int) -> np.ndarray:
    """63-bit order keys: blake2b of (path, repeat) keyed by (seed, epoch). A path names one
    row of a split (image hashes do not: identical tiles exist), so keys are distinct."""
    salt = hashlib.blake2b(f"crackray-epoch:{seed}:{epoch}".encode()).digest()
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(f"{path}\0{copy}".encode(), digest_size=8, key=salt).digest(),
                "little",
            )
            >> 1
            for path, copy in zip(paths, copies, strict=True)
        ),
        dtype=np.int64,
        count=len(paths),
    )
