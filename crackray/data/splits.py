"""Photo-grouped, stratified train/val/test splits and the content digest of a dataset.

Tiles cut from one photograph are near-duplicates, so a photograph is the unit of assignment:
splitting by tile would leak the validation set into training.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from crackray.errors import ConfigError

TRAIN, VAL, TEST = "train", "val", "test"  # the one definition of the split names
SPLITS = (TRAIN, VAL, TEST)
ATTEMPTS = 32  # shuffles tried per call; cheap (a few ms for ~200 photos)


def split_fractions(val: float, test: float) -> np.ndarray:
    """(train, val, test) fractions; refuses values that leave no training data."""
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise ConfigError(f"val ({val}) and test ({test}) must be >= 0 and sum to less than 1")
    return np.array([1.0 - val - test, val, test])


def _photo_summary(items: Iterable[Mapping]) -> dict[str, tuple[str, np.ndarray]]:
    """photo_id -> (its most common surface, [no_crack tiles, crack tiles])."""
    counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(2, dtype=np.int64))
    surfaces: dict[str, Counter] = defaultdict(Counter)
    for item in items:
        counts[item["photo_id"]][int(item["label"])] += 1
        surfaces[item["photo_id"]][item["surface"]] += 1
    # most_common breaks ties by first occurrence, so sort surfaces first to stay deterministic.
    return {
        pid: (max(sorted(surfaces[pid]), key=surfaces[pid].__getitem__), counts[pid])
        for pid in counts
    }


def _greedy(
    photos: dict[str, tuple[str, np.ndarray]],
    strata: dict[tuple[str, bool], list[str]],
    fractions: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, str]:
    """One assignment: per stratum, shuffled photos each go where they best close the gap."""
    assignment: dict[str, str] = {}
    for key in sorted(strata):
        ids = sorted(strata[key])  # sorted first: the result must not depend on input order
        rng.shuffle(ids)
        tiles = np.stack([photos[pid][1] for pid in ids])
        target = fractions[:, None] * tiles.sum(axis=0)  # (split, class)
        current = np.zeros_like(target)
        for pid, counts in zip(ids, tiles, strict=True):
            # Increase of sum((current - target)^2) if this photo joins each split.
            cost = (counts * (2.0 * (current - target) + counts)).sum(axis=1)
            cost[fractions == 0.0] = np.inf  # a split asked to be empty stays empty
            best = int(np.argmin(cost))
            current[best] += counts
            assignment[pid] = SPLITS[best]
    return assignment


def _imbalance(
    assignment: dict[str, str], photos: dict[str, tuple[str, np.ndarray]], fractions: np.ndarray
) -> float:
    """Largest absolute gap of any split's size share, crack share or surface shares from the
    target (sizes) or the whole dataset (crack and surface shares)."""
    surfaces = sorted({surface for surface, _ in photos.values()})
    tally = np.zeros((len(SPLITS), len(surfaces), 2))  # split x surface x class tiles
    for pid, (surface, counts) in photos.items():
        tally[SPLITS.index(assignment[pid]), surfaces.index(surface)] += counts
    whole = tally.sum(axis=0)
    sizes = tally.sum(axis=(1, 2))
    gaps = list(np.abs(sizes / sizes.sum() - fractions))
    for split, size in zip(tally, sizes, strict=True):
        if size:
            gaps.append(abs(split[:, 1].sum() / size - whole[:, 1].sum() / whole.sum()))
            gaps.extend(np.abs(split.sum(axis=1) / size - whole.sum(axis=1) / whole.sum()))
    return float(max(gaps))


def assign_splits(
    items: Iterable[Mapping], val: float = 0.15, test: float = 0.15, seed: int = 0
) -> dict[str, str]:
    """photo_id -> 'train' | 'val' | 'test' for items with keys photo_id, label, surface.

    Photos are stratified by (surface, has any crack tile). Within a stratum they are shuffled
    with `seed`, then each goes to the split where it most reduces the squared gap between the
    split's (no_crack, crack) tile counts and their targets. Photos hold very different numbers
    of tiles, so one shuffle can still land a large photo badly: the best of ATTEMPTS shuffles
    (smallest `_imbalance`) is kept. Same seed, same result; another seed, other shuffles.
    """
    fractions = split_fractions(val, test)
    photos = _photo_summary(items)
    strata: dict[tuple[str, bool], list[str]] = defaultdict(list)
    for pid, (surface, counts) in photos.items():
        strata[(surface, bool(counts[1]))].append(pid)
    rng = np.random.default_rng(seed)
    candidates = [_greedy(photos, strata, fractions, rng) for _ in range(ATTEMPTS)]
    return min(candidates, key=lambda a: _imbalance(a, photos, fractions))


def dataset_digest(rows: Iterable[Mapping]) -> str:
    """sha256 over the sorted (image sha256, label, split) triples: what was split, and how."""
    triples = sorted(f"{r['sha256']}\t{int(r['label'])}\t{r['split']}" for r in rows)
    return hashlib.sha256("\n".join(triples).encode()).hexdigest()
