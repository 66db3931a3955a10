"""Training epochs on Ray Data: every worker builds its own share of each epoch, in a fresh
uniform random order that depends only on (train.seed, epoch), so a resumed run repeats it."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import ray.data

from crackray.config import RunConfig
from crackray.data.composition import positive_repeats
from crackray.data.pipeline import decoded, read_shards
from crackray.data.shards import read_split_table, split_files
from crackray.data.splits import TRAIN
from crackray.sampling import frequency_sampler

_KEY_LIMIT = 2**63  # 63-bit keys: they fit Arrow's int64
_UNSIGNED_64 = 2**64 - 1  # numpy seeds are non-negative; train.seed may be any int


def training_epoch(
    cfg: RunConfig, epoch: int, *, rank: int = 0, world_size: int = 1, with_masks: bool = False
) -> ray.data.Dataset:
    """The rows worker `rank` of `world_size` trains on in `epoch`, in training order, decoded
    and augmented: a Dataset each worker builds and iterates itself, every epoch.

    The epoch holds every crack row `positive_repeats` times (balanced sampling), and the
    crack-free rows: all, the frequency sampler's draw for the epoch, or none without
    `use_negatives` (`composition.epoch_composition` counts the same rows). Each row (and
    repeat) gets a key, a keyed hash of its path, repeat index, `train.seed` and the epoch;
    worker r takes the r-th of `world_size` equal runs of the epoch in key order (the
    remainder dropped, so every worker takes the same number of steps): a fresh uniform
    random partition each epoch. Its run is then shuffled by Ray Data (`random_shuffle`, a
    global shuffle at any size, seeded by (train.seed, epoch, rank)) before decoding, so the
    shuffle moves encoded bytes (~10 KB a tile, ~15x less than decoded). The key also seeds
    the row's augmentation. Everything is a function of (train.seed, epoch, rank, world size):
    epoch e visits the same rows in the same order whenever it runs, resumed or not.

    Why not one Dataset that Ray Train splits: `prepare` writes splits sorted by path, so the
    order must change globally every epoch, and Ray Data's per-execution reseeding
    (`RandomSeedConfig(reseed_after_execution=True)`) counts executions in the process that
    runs them: after a restart, epoch k would get epoch 0's order. One Dataset per epoch for
    Train to split costs a split-coordinator actor per epoch (~290 MB each, alive until the
    run ends). Here each worker reads the whole split's encoded rows to pick its own, a small
    cost next to decoding them.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    table = read_split_table(cfg.data.path, TRAIN, columns=["path", "label"])
    paths = np.asarray(table.column("path").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy()
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    sampler = frequency_sampler(cfg)  # None unless data.frequency_sampling
    selection = {
        "repeats": positive_repeats(cfg, n_pos, n_neg),
        "negatives": cfg.data.use_negatives,
        "selected": sampler.selections(epoch + 1)[epoch] if sampler else None,
    }
    index, copies = _epoch_index(labels, paths, **selection)
    keys = np.sort(_row_keys(paths[index], copies, cfg.train.seed, epoch))
    if len(np.unique(keys)) < len(keys):  # 63-bit keys: ~1e-8 odds at a million rows
        raise RuntimeError(f"two training rows share an order key in epoch {epoch}: reseed")
    share = len(keys) // world_size
    if share == 0:
        raise ValueError(
            f"epoch {epoch} has {len(keys)} training rows, fewer than {world_size} workers"
        )
    low = 0 if rank == 0 else int(keys[rank * share])
    high = int(keys[(rank + 1) * share]) if (rank + 1) * share < len(keys) else _KEY_LIMIT
    mine = read_shards(split_files(cfg.data.path, TRAIN), with_masks).map_batches(
        _epoch_rows,
        batch_size=None,
        batch_format="pyarrow",
        zero_copy_batch=True,
        fn_kwargs={**selection, "seed": cfg.train.seed, "epoch": epoch, "low": low, "high": high},
    )
    # Seeded, Ray's random_shuffle is a pure function of its input blocks (a fixed read of
    # fixed files). Sorting by `key` would fix the order too, but Ray 2.60's sort waited ~30 s
    # before reading here: 33-46 s for an epoch of the SDNET subset against 9-11 s.
    seed = np.random.SeedSequence([cfg.train.seed & _UNSIGNED_64, epoch, rank])
    shuffled = mine.random_shuffle(seed=int(seed.generate_state(1)[0]))
    return decoded(shuffled, cfg, train=True, with_masks=with_masks)


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


def _epoch_rows(
    block: pa.Table,
    *,
    repeats: int,
    negatives: bool,
    selected: frozenset[str] | None,
    seed: int,
    epoch: int,
    low: int,
    high: int,
) -> pa.Table:
    """One block's rows of the epoch whose key falls in this worker's [low, high), with `key`."""
    paths = np.asarray(block.column("path").to_pylist(), dtype=object)
    labels = block.column("label").to_numpy()
    index, copies = _epoch_index(
        labels, paths, repeats=repeats, negatives=negatives, selected=selected
    )
    keys = _row_keys(paths[index], copies, seed, epoch)
    mine = (keys >= low) & (keys < high)
    return block.take(pa.array(index[mine])).append_column("key", pa.array(keys[mine]))
