"""Photo-grouped stratified splits and the dataset digest (pure functions, no files)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from crackray.data.splits import assign_splits, dataset_digest
from crackray.errors import ConfigError


def _tiles(n_photos: int = 240, seed: int = 0) -> list[dict]:
    """Photos of 1-40 tiles on three surfaces; cracked photos hold a mix of both classes."""
    rng = np.random.default_rng(seed)
    items = []
    for p in range(n_photos):
        surface = ["D", "P", "W"][p % 3]
        cracked_share = rng.uniform(0.1, 0.6) if rng.random() < 0.4 else 0.0
        for _ in range(int(rng.integers(1, 41))):
            label = int(rng.random() < cracked_share)
            items.append({"photo_id": f"{surface}{p}", "surface": surface, "label": label})
    return items


def _shares(rows: list[dict], n_all: int) -> dict[str, float]:
    """Share of all tiles, crack share and surface shares of a group of tiles."""
    surfaces = Counter(r["surface"] for r in rows)
    return {
        "size": len(rows) / n_all,
        "crack": np.mean([r["label"] for r in rows]),
        **{s: surfaces[s] / len(rows) for s in "DPW"},
    }


def test_every_photo_gets_exactly_one_split():
    items = _tiles()
    assignment = assign_splits(items, 0.15, 0.15, seed=0)
    assert set(assignment) == {i["photo_id"] for i in items}
    assert set(assignment.values()) == {"train", "val", "test"}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_splits_approach_fractions_and_keep_strata_balanced(seed):
    items = _tiles(seed=seed)
    whole = _shares(items, len(items))
    assignment = assign_splits(items, 0.15, 0.15, seed)
    for split in ("train", "val", "test"):
        shares = _shares([i for i in items if assignment[i["photo_id"]] == split], len(items))
        assert shares["size"] == pytest.approx(
            {"train": 0.7, "val": 0.15, "test": 0.15}[split], abs=0.03
        )
        for key in ("crack", "D", "P", "W"):
            assert shares[key] == pytest.approx(whole[key], abs=0.04), (split, key)


def test_same_seed_same_split_other_seed_other_split_any_input_order():
    items = _tiles()
    first = assign_splits(items, 0.2, 0.1, seed=7)
    assert assign_splits(list(reversed(items)), 0.2, 0.1, seed=7) == first
    assert assign_splits(items, 0.2, 0.1, seed=8) != first


def test_zero_fraction_leaves_the_split_empty():
    items = _tiles(60)
    assert "test" not in set(assign_splits(items, 0.2, 0.0, seed=0).values())
    assert set(assign_splits(items, 0.0, 0.0, seed=0).values()) == {"train"}


def test_a_photo_on_two_surfaces_is_still_one_unit():
    items = [
        {"photo_id": "x", "surface": "D", "label": 1},
        {"photo_id": "x", "surface": "W", "label": 0},
    ]
    items += [{"photo_id": str(i), "surface": "W", "label": i % 2} for i in range(30)]
    assignment = assign_splits(items, 0.2, 0.2, seed=0)
    assert len(assignment) == 31 and assignment["x"] in ("train", "val", "test")


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0), (0.3, 0.9)])
def test_bad_fractions_are_refused(val, test):
    with pytest.raises(ConfigError, match="sum to less than 1"):
        assign_splits(_tiles(10), val, test, seed=0)


def test_digest_covers_content_label_and_split_but_not_order():
    rows = [
        {"sha256": "a" * 64, "label": 1, "split": "train", "path": "x"},
        {"sha256": "b" * 64, "label": 0, "split": "val", "path": "y"},
    ]
    digest = dataset_digest(rows)
    assert len(digest) == 64 and digest == dataset_digest(list(reversed(rows)))
    assert dataset_digest([{**rows[0], "path": "moved"}, rows[1]]) == digest  # paths do not count
    assert dataset_digest([{**rows[0], "split": "test"}, rows[1]]) != digest
    assert dataset_digest([{**rows[0], "label": 0}, rows[1]]) != digest
    assert dataset_digest([rows[0], {**rows[1], "sha256": "c" * 64}]) != digest
