"""Datasets with pixel masks: CrackForest (real) and CRACK500 (layout faked in tmp)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crackray.data.catalog import crack500_photo_id
from crackray.data.images import decode_mask, decode_rgb, encode_jpeg, encode_png
from crackray.data.prepare import prepare_cfd, prepare_crack500
from crackray.data.shards import read_split_table, verify_dataset
from crackray.data.synthetic import make_tile
from crackray.errors import DataError

CFD = Path(__file__).resolve().parents[2] / "shared" / "data" / "crackforest_cfd"
SPLITS = ("train", "val", "test")


def _rows(out: Path, columns: list[str] | None = None) -> list[dict]:
    return [row for s in SPLITS for row in read_split_table(out, s, columns).to_pylist()]


def _require_cfd() -> None:
    if not CFD.is_dir():
        pytest.skip(f"real CrackForest data not found at {CFD} (expected beside the repo)")


@pytest.fixture(scope="module")
def cfd_whole(tmp_path_factory):
    _require_cfd()
    out = tmp_path_factory.mktemp("cfd") / "whole"
    return out, prepare_cfd(CFD, out, seed=0)


@pytest.fixture(scope="module")
def cfd_tiles(tmp_path_factory):
    _require_cfd()
    out = tmp_path_factory.mktemp("cfd") / "tiles"
    return out, prepare_cfd(CFD, out, tile=128, seed=0)


# ---------------------------------------------------------------------------------------------
# CrackForest


def test_cfd_labels_and_masks_come_from_the_mask_files(cfd_whole):
    out, manifest = cfd_whole
    assert verify_dataset(out) == manifest and manifest["has_masks"] is True
    rows = _rows(out)
    assert len(rows) + manifest["duplicates_dropped"] + manifest["quarantined"] == 118
    assert all(row["label"] == 1 and row["has_mask"] for row in rows)  # every CFD image is cracked
    for row in rows[:10]:
        source = np.asarray(Image.open(CFD / "masks" / (Path(row["path"]).stem + ".png")))
        assert np.array_equal(decode_mask(row["mask"]), (source > 127).astype(np.uint8))
        assert decode_rgb(row["image"]).shape == (320, 480, 3)
        assert row["surface"] == "pavement" and row["photo_id"] == Path(row["path"]).stem


def test_cfd_tiles_give_negatives_and_stay_with_their_photo(cfd_tiles):
    out, manifest = cfd_tiles
    assert verify_dataset(out) == manifest and manifest["tile"] == 128
    rows = _rows(out)
    assert len(rows) + manifest["duplicates_dropped"] == 118 * 6  # 3 x 2 tiles of 480x320
    labels = [row["label"] for row in rows]
    assert 0 < sum(labels) < len(labels)  # tiling produced crack-free negatives
    for row in rows[::25]:
        mask = decode_mask(row["mask"])
        assert decode_rgb(row["image"]).shape == (128, 128, 3) and mask.shape == (128, 128)
        assert mask.any() == bool(row["label"])
        image_path, corner = row["path"].split("#")
        x, y = map(int, corner.split(","))
        source = np.asarray(Image.open(CFD / "masks" / (Path(image_path).stem + ".png")))
        assert np.array_equal(mask, (source[y : y + 128, x : x + 128] > 127).astype(np.uint8))
    split_of: dict[str, set[str]] = {}
    for row in rows:
        split_of.setdefault(row["photo_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of.values())
    for split in SPLITS:
        assert manifest["totals"][split]["no_crack"] > 0


# ---------------------------------------------------------------------------------------------
# Fake layouts


def _write_pair(image_path: Path, mask_path: Path, rng, size=(48, 32), crack=True) -> None:
    """A synthetic image and its 0/255 mask, `size` = (width, height)."""
    image, mask = make_tile(rng, max(size), crack=crack)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    image_path.write_bytes(encode_jpeg(np.ascontiguousarray(image[: size[1], : size[0]])))
    mask_path.write_bytes(encode_png(np.ascontiguousarray(mask[: size[1], : size[0]])))


def test_cfd_mask_size_mismatch_names_the_file(tmp_path):
    rng = np.random.default_rng(0)
    for stem in ("001", "002"):
        _write_pair(tmp_path / "images" / f"{stem}.jpg", tmp_path / "masks" / f"{stem}.png", rng)
    (tmp_path / "masks" / "002.png").write_bytes(encode_png(np.zeros((20, 30), np.uint8)))
    with pytest.raises(
        DataError, match=r"002\.png: mask is 30x20 but its image images/002\.jpg is 48x32"
    ):
        prepare_cfd(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cfd_missing_mask_is_quarantined_and_bad_layout_explained(tmp_path):
    rng = np.random.default_rng(0)
    for stem in ("001", "002", "003"):
        _write_pair(tmp_path / "images" / f"{stem}.jpg", tmp_path / "masks" / f"{stem}.png", rng)
    (tmp_path / "masks" / "003.png").unlink()
    manifest = prepare_cfd(tmp_path, tmp_path / "out", val=0.0, test=0.0)
    with (tmp_path / "out" / "quarantine.csv").open() as handle:
        assert list(csv.reader(handle)) == [
            ["path", "reason"],
            ["images/003.jpg", "no mask masks/003.png"],
        ]
    assert manifest["totals"]["train"]["samples"] == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected images/<id>.jpg with masks/<id>.png"):
        prepare_cfd(tmp_path / "empty", tmp_path / "out2")


@pytest.fixture
def crack500(tmp_path) -> Path:
    """CRACK500-like: crops named <photo>_<r>_<c>, masks of the same stem, list files."""
    src = tmp_path / "crack500"
    rng = np.random.default_rng(0)
    for folder, photo in (("traincrop", "20160222_080850"), ("valcrop", "20160222_081011")):
        for r, c in ((1, 1), (1, 361), (361, 1)):
            stem = f"{photo}_{r}_{c}"
            _write_pair(
                src / folder / f"{stem}.jpg", src / folder / f"{stem}.png", rng, crack=c == 1
            )
    _write_pair(src / "testcrop" / "x_1_1.jpg", src / "testmasks" / "x_1_1_mask.png", rng)
    _write_pair(src / "traincrop" / "unlisted_1_1.jpg", src / "traincrop" / "unlisted_1_1.png", rng)
    (src / "train.txt").write_text(
        "traincrop/20160222_080850_1_1.jpg traincrop/20160222_080850_1_1.png\n"
        "traincrop/20160222_080850_1_361.jpg\n"
        "./traincrop/20160222_080850_361_1.jpg\n"
        "\n"
        "traincrop/gone_1_1.jpg traincrop/gone_1_1.png\n"
    )
    (src / "val.txt").write_text(
        "".join(f"valcrop/20160222_081011_{rc}.jpg\n" for rc in ("1_1", "1_361"))
    )
    (src / "test.txt").write_text("testcrop/x_1_1.jpg\nvalcrop/20160222_081011_361_1.jpg\n")
    return src


def test_crack500_list_files_fix_the_split(crack500, tmp_path):
    with (
        pytest.warns(UserWarning, match="1 of 8 CRACK500 images are not placed"),  # unlisted_1_1
        pytest.warns(UserWarning, match="20160222_081011: val 2, test 1"),
    ):
        manifest = prepare_crack500(crack500, tmp_path / "out", seed=3)
    assert manifest["split_method"] == "lists" and verify_dataset(tmp_path / "out") == manifest
    got = {row["path"]: row["split"] for row in _rows(tmp_path / "out", ["path", "split"])}
    assert got == {
        "traincrop/20160222_080850_1_1.jpg": "train",
        "traincrop/20160222_080850_1_361.jpg": "train",
        "traincrop/20160222_080850_361_1.jpg": "train",
        "valcrop/20160222_081011_1_1.jpg": "val",
        "valcrop/20160222_081011_1_361.jpg": "val",
        "valcrop/20160222_081011_361_1.jpg": "test",  # the lists win over folder names
        "testcrop/x_1_1.jpg": "test",  # mask found elsewhere under SRC as x_1_1_mask.png
    }
    with (tmp_path / "out" / "quarantine.csv").open() as handle:
        assert list(csv.reader(handle))[1:] == [
            ["traincrop/gone_1_1.jpg", "listed in train.txt but not found"]
        ]
    for row in _rows(tmp_path / "out"):
        assert row["label"] == int(decode_mask(row["mask"]).any())


def test_crack500_without_lists_groups_crops_by_photo(crack500, tmp_path):
    for name in ("train.txt", "val.txt", "test.txt"):
        (crack500 / name).unlink()
    manifest = prepare_crack500(crack500, tmp_path / "out", tile=16, val=0.3, test=0.3, seed=0)
    assert manifest["split_method"] == "photo-grouped" and manifest["tile"] == 16
    rows = _rows(tmp_path / "out", ["path", "photo_id", "split", "label"])
    assert len(rows) + manifest["duplicates_dropped"] == 8 * 6  # 8 images of 48x32, 3 x 2 tiles
    photos = {row["photo_id"] for row in rows}
    assert photos == {"20160222_080850", "20160222_081011", "x", "unlisted"}
    for photo in photos:
        assert len({row["split"] for row in rows if row["photo_id"] == photo}) == 1
    assert crack500_photo_id("20160222_080850") == "20160222_080850"
    assert crack500_photo_id("20160222_080850_1_361") == "20160222_080850"


def test_crack500_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        prepare_crack500(tmp_path / "absent", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CRACK500 images found"):
        prepare_crack500(tmp_path / "empty", tmp_path / "out")


def _expected_photos_in_several_splits(placed: dict[str, list[str]]) -> dict:
    """{photo: {split: crops}} for the photos whose crops `placed` ({split: stems}) splits."""
    crops: dict[str, dict[str, int]] = {}
    for split, stems in placed.items():
        for stem in stems:
            per_split = crops.setdefault(crack500_photo_id(stem), {})
            per_split[split] = per_split.get(split, 0) + 1
    return {photo: splits for photo, splits in crops.items() if len(splits) > 1}


def test_crack500_lists_are_used_as_given_and_photos_across_lists_warned(tmp_path):
    placed = {
        "train": ["A_1_1", "A_1_361", "B_1_1", "D_1_1"],
        "val": ["A_361_1", "D_1_361"],
        "test": ["B_1_361", "C_1_1"],
    }
    rng = np.random.default_rng(0)
    for split, stems in placed.items():
        for stem in stems:
            folder = tmp_path / "src" / f"{split}crop"
            _write_pair(folder / f"{stem}.jpg", folder / f"{stem}.png", rng)
        (tmp_path / "src" / f"{split}.txt").write_text(
            "".join(f"{split}crop/{stem}.jpg {split}crop/{stem}.png\n" for stem in stems)
        )
    _write_pair(tmp_path / "src" / "extra" / "E_1_1.jpg", tmp_path / "src" / "E_1_1.png", rng)
    with pytest.warns(UserWarning) as caught:
        manifest = prepare_crack500(tmp_path / "src", tmp_path / "out")
    messages = [str(w.message) for w in caught]
    expected = _expected_photos_in_several_splits(placed)
    assert set(expected) == {"A", "B", "D"}  # the layout holds what the test is about
    assert manifest["photos_in_several_splits"] == expected
    (several,) = [m for m in messages if "more than one" in m]
    assert f"crops of {len(expected)} source photo(s)" in several
    combinations = Counter("+".join(splits) for splits in expected.values())
    assert combinations == {"train+val": 2, "train+test": 1}
    assert all(f"{c}: {n}" in several for c, n in combinations.items())
    assert f"{sum(sum(s.values()) for s in expected.values())} crops" in several
    images = sum(map(len, placed.values())) + 1
    assert any(f"1 of {images} CRACK500 images are not placed by train.txt" in m for m in messages)
    got = {row["path"]: row["split"] for row in _rows(tmp_path / "out", ["path", "split"])}
    assert got == {
        f"{split}crop/{stem}.jpg": split for split, stems in placed.items() for stem in stems
    }


def test_crack500_split_folders_are_used_as_given(tmp_path):
    placed = {"train": ["P_1_1", "P_1_361"], "val": ["Q_1_1"], "test": ["Q_1_361", "R_1_1"]}
    rng = np.random.default_rng(1)
    for split, stems in placed.items():
        for stem in stems:
            root = tmp_path / "src" / split
            _write_pair(root / "images" / f"{stem}.jpg", root / "masks" / f"{stem}.png", rng)
    _write_pair(tmp_path / "src" / "misc" / "S_1_1.jpg", tmp_path / "src" / "S_1_1.png", rng)
    with pytest.warns(UserWarning) as caught:
        manifest = prepare_crack500(tmp_path / "src", tmp_path / "out", seed=5)
    messages = [str(w.message) for w in caught]
    left_out = f"1 of {sum(map(len, placed.values())) + 1} CRACK500 images are not placed by the"
    assert any(left_out in m and "train/ val/ test/ folders" in m for m in messages)
    assert manifest["split_method"] == "lists"
    assert manifest["photos_in_several_splits"] == _expected_photos_in_several_splits(placed)
    got = {row["path"]: row["split"] for row in _rows(tmp_path / "out", ["path", "split"])}
    assert got == {
        f"{split}/images/{stem}.jpg": split for split, stems in placed.items() for stem in stems
    }


def test_decode_mask_resizes_without_blurring():
    mask = np.zeros((40, 40), np.uint8)
    mask[10:12, :] = 255
    small = decode_mask(encode_png(mask), size=20)
    assert small.shape == (20, 20) and set(np.unique(small)) == {0, 1}
    assert np.array_equal(
        decode_mask(encode_png((mask > 0).astype(np.uint8))), (mask > 0).astype(np.uint8)
    )
