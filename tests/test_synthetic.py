"""Synthetic demo tiles: shapes, masks, realism checks, and the prepared demo dataset."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from crackray.data.images import decode_mask, decode_rgb, encode_jpeg
from crackray.data.prepare import prepare_sdnet2018, prepare_synthetic
from crackray.data.shards import SCHEMA, read_split_table, verify_dataset
from crackray.data.synthetic import make_tile


@pytest.fixture(scope="module")
def tiles() -> list[tuple[np.ndarray, np.ndarray, bool]]:
    rng = np.random.default_rng(0)
    return [(*make_tile(rng, 128, crack=i % 2 == 0), i % 2 == 0) for i in range(200)]


def test_shapes_dtypes_and_masks(tiles):
    for image, mask, crack in tiles:
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert mask.shape == (128, 128) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert mask.any() == crack  # non-empty iff crack
    rng = np.random.default_rng(1)
    image, mask = make_tile(rng)  # defaults: 256 px, no crack
    assert image.shape == (256, 256, 3) and not mask.any()


def test_cracks_are_thin_and_darker_than_their_surroundings(tiles):
    gaps = []
    for image, mask, crack in tiles:
        if not crack:
            continue
        grey = image.mean(axis=2)
        on = mask > 0
        ring = ndimage.binary_dilation(on, iterations=4) & ~on
        gaps.append(grey[ring].mean() - grey[on].mean())
        assert on.mean() < 0.1  # a crack is a thin line, not a region
    assert np.mean(gaps) > 15
    assert np.mean(np.array(gaps) > 0) > 0.95


def test_brightness_alone_does_not_give_the_label_away(tiles):
    brightness = np.array([image.mean() for image, _, _ in tiles])
    labels = np.array([crack for _, _, crack in tiles])
    # AUC of "darker tile => crack": 0.5 is chance; a shortcut would push it toward 1.
    pos, neg = brightness[labels], brightness[~labels]
    auc = (neg[None, :] > pos[:, None]).mean()
    assert abs(auc - 0.5) < 0.15
    # Crack-free tiles carry crack look-alikes (straight joints, dark spots) often enough.
    dark_lines = [
        (image.mean(axis=2) < image.mean() * 0.8).mean() for image, _, c in tiles if not c
    ]
    assert np.mean(np.array(dark_lines) > 0.003) > 0.3


def test_seeds_reproduce_and_differ():
    a = make_tile(np.random.default_rng(3), 64, crack=True)
    b = make_tile(np.random.default_rng(3), 64, crack=True)
    c = make_tile(np.random.default_rng(4), 64, crack=True)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_tiles_are_fast():
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(40):
        make_tile(rng, 256, crack=i % 2 == 0)
    # ~3.5 ms a tile measured; the bound is loose because CI machines are shared.
    assert (time.perf_counter() - start) / 40 < 0.025


def _sdnet_layout(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for folder in ("D/CD", "D/UD", "P/CP", "P/UP"):
        (root / folder).mkdir(parents=True)
        for i in range(6):
            image, _ = make_tile(rng, 32, crack=folder[2] == "C")
            (root / folder / f"{i % 3}-{i}.jpg").write_bytes(encode_jpeg(image))
    return root


def test_prepared_demo_matches_the_real_dataset_format(tmp_path):
    manifest = prepare_synthetic(
        tmp_path / "demo", n=80, seed=0, image_size=64, crack_fraction=0.25
    )
    sdnet_like = prepare_sdnet2018(_sdnet_layout(tmp_path / "src"), tmp_path / "sdnet")
    assert set(manifest) == set(sdnet_like)
    assert set(manifest["totals"]) == set(sdnet_like["totals"]) == {"train", "val", "test"}
    assert manifest["source"] == "synthetic" and manifest["has_masks"] is True
    assert verify_dataset(tmp_path / "demo") == manifest
    assert sum(t["crack"] for t in manifest["totals"].values()) == 20
    assert manifest["totals"]["val"]["samples"] == pytest.approx(12, abs=2)
    for split in ("train", "val", "test"):
        table = read_split_table(tmp_path / "demo", split)
        assert table.schema.equals(SCHEMA) and all(table["has_mask"].to_pylist())
        for row in table.to_pylist():
            image, mask = decode_rgb(row["image"]), decode_mask(row["mask"])
            assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
            assert mask.any() == bool(row["label"])
    again = prepare_synthetic(tmp_path / "again", n=80, seed=0, image_size=64, crack_fraction=0.25)
    other = prepare_synthetic(tmp_path / "other", n=80, seed=1, image_size=64, crack_fraction=0.25)
    assert again["files"] == manifest["files"] and other["digest"] != manifest["digest"]
