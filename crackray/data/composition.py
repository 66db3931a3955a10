"""What one training epoch contains, from the training split's class counts and the sampling
options: how often each crack tile is repeated, how many crack-free tiles are drawn, and the
crack-class weight that matches. No Ray: the driver, the pipeline and the loss all ask here,
so the epoch the workers train on and the `pos_weight` the loss uses cannot disagree.
"""

from __future__ import annotations

from typing import NamedTuple

from crackray.config import RunConfig


class EpochComposition(NamedTuple):
    positives: int  # crack rows of one epoch, repeats included
    negatives: int  # crack-free rows of one epoch

    @property
    def rows(self) -> int:
        return self.positives + self.negatives


def positive_repeats(cfg: RunConfig, n_pos: int, n_neg: int) -> int:
    """How often each cracked training row appears per epoch (balanced sampling: about half
    of an epoch is cracks)."""
    if not cfg.data.balanced_sampling or not cfg.data.use_negatives:
        return 1
    return max(1, round(n_neg / max(n_pos, 1)))


def epoch_composition(cfg: RunConfig, n_pos: int, n_neg: int) -> EpochComposition:
    """Crack and crack-free rows of one epoch after negative filtering, oversampling and
    (frequency sampling) drawing as many negatives as there are positives."""
    positives = n_pos * positive_repeats(cfg, n_pos, n_neg)
    negatives = n_neg if cfg.data.use_negatives else 0
    if cfg.data.frequency_sampling:
        negatives = min(negatives, positives)
    return EpochComposition(positives, negatives)


def epoch_rows(cfg: RunConfig, n_pos: int, n_neg: int) -> int:
    """Training rows per epoch (all workers together)."""
    return epoch_composition(cfg, n_pos, n_neg).rows
