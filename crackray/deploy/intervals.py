"""How sure a test figure is: percentile bootstrap intervals of precision, recall and F1
that resample photographs, not tiles.

Tiles cut from one photograph are near-duplicates that share their errors, so resampling
tiles one by one would treat them as independent evidence and give intervals that are too
narrow. Each resample draws as many photo ids as the split holds, with replacement, and
keeps every tile of each drawn photo (a photo drawn twice counts twice).
"""

from __future__ import annotations

import numpy as np

METRICS = ("precision", "recall", "f1")
_CHUNK = 256  # resamples counted at once: bounds memory at _CHUNK x photos integers


def photo_bootstrap(probs, targets, photo_ids, threshold: float, *, resamples: int = 2000,
                    level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """{metric: (low, high)}: the central `level` interval of precision, recall and F1 at
    `threshold` (crack iff probability >= threshold) over photo-grouped resamples. Photos are
    numbered in sorted order of their ids and drawn with `np.random.default_rng(seed)`, one
    resample after another. A resample where a metric is undefined (no predicted or no true
    crack) is left out of that metric's interval; NaN when none defines it."""
    probs, targets = np.asarray(probs), np.asarray(targets).astype(bool)
    if not len(probs) == len(targets) == len(photo_ids) > 0:
        raise ValueError(f"need equal, non-zero lengths: {len(probs)} probs, "
                         f"{len(targets)} targets, {len(photo_ids)} photo ids")
    decided = probs >= threshold
    _, photo = np.unique(np.asarray(photo_ids, dtype=str), return_inverse=True)
    n_photos = int(photo.max()) + 1
    # Per photo: true positives, false positives, false negatives.
    per_photo = np.stack([np.bincount(photo, weights=w, minlength=n_photos) for w in
                          (decided & targets, decided & ~targets, ~decided & targets)])
    rng = np.random.default_rng(seed)
    values = {name: [] for name in METRICS}
    for start in range(0, resamples, _CHUNK):
        draws = rng.integers(0, n_photos, size=(min(_CHUNK, resamples - start), n_photos))
        tp, fp, fn = per_photo[:, draws].sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            values["precision"].append(tp / (tp + fp))
            values["recall"].append(tp / (tp + fn))
            values["f1"].append(2 * tp / (2 * tp + fp + fn))
    tail = 100 * (1 - level) / 2
    out = {}
    for name, parts in values.items():
        samples = np.concatenate(parts)
        samples = samples[~np.isnan(samples)]
        low, high = np.percentile(samples, [tail, 100 - tail]) if samples.size else (np.nan,) * 2
        out[name] = (float(low), float(high))
    return out
