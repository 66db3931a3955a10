"""Frequency-of-use sampling of negatives (SegDecNet, Božič et al. 2021).

Each epoch trains on every positive and on as many negatives as there are positives, drawn
from the negatives used least so far: over the epochs every negative is seen about equally
often, while an epoch stays short when negatives far outnumber positives. With no more
negatives than positives, every negative is drawn every epoch.

Ray-Data compatible by construction: the selection is a pure function of (negative ids, seed,
epoch), so every Train worker computes the same set without any message, and a restart from a
checkpoint replays the same draws. The rows still stream through Ray Data's decode step; the
workers drop the unselected negatives after it (`pipeline.iterate_batches(keep=...)`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from crackray.config import RunConfig
from crackray.data.pipeline import TRAIN, positive_repeats
from crackray.data.shards import read_split_table


class FrequencySampler:
    """The negatives of one epoch: the `per_epoch` least-used, ties broken at random."""

    def __init__(self, negatives: list[str], per_epoch: int, seed: int = 0):
        self.negatives = sorted(negatives)  # sorted: the same order on every worker
        self.per_epoch = min(per_epoch, len(self.negatives))
        self.seed = seed

    def counts_before(self, epoch: int) -> np.ndarray:
        """How often each negative was drawn in epochs 0..epoch-1."""
        counts = np.zeros(len(self.negatives), dtype=np.int64)
        for past in range(epoch):
            counts[self._draw(past, counts)] += 1
        return counts

    def selection(self, epoch: int) -> set[str]:
        chosen = self._draw(epoch, self.counts_before(epoch))
        return {self.negatives[i] for i in chosen}

    def _draw(self, epoch: int, counts: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        tie_break = rng.random(len(counts))
        order = np.lexsort((tie_break, counts))  # least used first, random among equals
        return order[: self.per_epoch]


def frequency_sampler(cfg: RunConfig) -> FrequencySampler | None:
    """The sampler for a run's training split, or None when the option is off (or moot)."""
    if not (cfg.data.frequency_sampling and cfg.data.use_negatives):
        return None
    table = read_split_table(cfg.data.path, TRAIN, columns=["path", "label"])
    labels = table.column("label").to_numpy()
    paths = np.asarray(table.column("path").to_pylist(), dtype=object)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    per_epoch = n_pos * positive_repeats(cfg, n_pos, n_neg)
    return FrequencySampler(paths[labels == 0].tolist(), per_epoch, cfg.train.seed)


def keep_rows(selected: set[str]):
    """A row filter for `iterate_batches`: positives always, negatives only if selected."""

    def keep(batch: dict) -> np.ndarray:
        chosen = np.fromiter((path in selected for path in batch["path"]), bool, len(batch["path"]))
        return (batch["label"] != 0) | chosen

    return keep


def lockstep(batches, device):
    """Stop every worker as soon as one has no batch left. DDP needs the same number of steps
    on every worker, and dropping unselected negatives after Ray Data's equal split can leave
    the shards a batch or two apart. The remainder is drained, not abandoned, so that Ray
    Data's split coordinator sees every shard finish its epoch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield from batches
        return
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        have = torch.tensor([int(batch is not None)], device=device)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if not have.item():
            break
        yield batch
    for _ in iterator:
        pass
