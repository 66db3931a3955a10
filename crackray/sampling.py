"""Frequency-of-use sampling of negatives (SegDecNet, Božič et al. 2021).

Each epoch trains on every positive and on as many negatives as there are positives, drawn
from the negatives used least so far: over the epochs every negative is seen about equally
often, while an epoch stays short when negatives far outnumber positives. With no more
negatives than positives, every negative is drawn every epoch.

Ray-Data compatible by construction: the selection is a pure function of (negative ids, seed,
epoch), so every worker draws the same negatives without a message and a restart from a
checkpoint replays the same draws. Each worker's epoch Dataset keeps only those, before the
shuffle and decoding (`epochs.training_epoch`). No Ray here.
"""

from __future__ import annotations

import numpy as np

from crackray.config import RunConfig
from crackray.data.composition import positive_repeats
from crackray.data.shards import read_split_table
from crackray.data.splits import TRAIN


class FrequencySampler:
    """The negatives of one epoch: the `per_epoch` least-used, ties broken at random."""

    def __init__(self, negatives: list[str], per_epoch: int, seed: int = 0):
        self.negatives = sorted(negatives)  # sorted: draws must not depend on input order
        self.per_epoch = min(per_epoch, len(self.negatives))
        self.seed = seed

    def counts_before(self, epoch: int) -> np.ndarray:
        """How often each negative was drawn in epochs 0..epoch-1."""
        counts = np.zeros(len(self.negatives), dtype=np.int64)
        for chosen in self._draws(epoch):
            counts[chosen] += 1
        return counts

    def selection(self, epoch: int) -> set[str]:
        return set(self.selections(epoch + 1)[epoch])

    def selections(self, epochs: int) -> list[frozenset[str]]:
        """The negatives of epochs 0..epochs-1, in one pass over the epochs."""
        return [frozenset(self.negatives[i] for i in chosen) for chosen in self._draws(epochs)]

    def _draws(self, epochs: int):
        counts = np.zeros(len(self.negatives), dtype=np.int64)
        for epoch in range(epochs):
            chosen = self._draw(epoch, counts)
            counts[chosen] += 1
            yield chosen

    def _draw(self, epoch: int, counts: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed & (2**64 - 1), epoch])  # any int seed
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
