"""`crackray prepare sdnet2018`: real data, bad input, atomic writes, shard verification."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from crackray.data import images, shards
from crackray.data.prepare import prepare_sdnet2018, prepare_synthetic
from crackray.data.shards import (
    SCHEMA,
    read_manifest,
    read_split_table,
    split_files,
    verify_dataset,
    write_dataset,
)
from crackray.data.synthetic import make_tile
from crackray.errors import DataError

SDNET = Path(__file__).resolve().parents[2] / "shared" / "data" / "sdnet2018"
SPLITS = ("train", "val", "test")


def _require_sdnet() -> None:
    if not SDNET.is_dir():
        pytest.skip(f"real SDNET2018 subset not found at {SDNET} (expected beside the repo)")


@pytest.fixture(scope="module")
def sdnet(tmp_path_factory):
    """The real 3,000 tiles prepared once (seed 0): (folder, manifest, {split: table})."""
    _require_sdnet()
    out = tmp_path_factory.mktemp("sdnet") / "ds"
    manifest = prepare_sdnet2018(SDNET, out, seed=0)
    return out, manifest, {split: read_split_table(out, split) for split in SPLITS}


# ---------------------------------------------------------------------------------------------
# The real data


def test_sdnet_photos_never_straddle_splits(sdnet):
    _, _, tables = sdnet
    photos = {split: set(tables[split]["photo_id"].to_pylist()) for split in SPLITS}
    assert not photos["train"] & photos["val"]
    assert not photos["train"] & photos["test"]
    assert not photos["val"] & photos["test"]
    assert sum(len(p) for p in photos.values()) == 137  # every source photograph is used


def test_sdnet_splits_keep_class_and_surface_balance(sdnet):
    _, manifest, tables = sdnet
    everything = [
        row for split in SPLITS for row in tables[split].select(["label", "surface"]).to_pylist()
    ]
    crack_share = np.mean([r["label"] for r in everything])
    surface_share = {
        s: n / len(everything) for s, n in Counter(r["surface"] for r in everything).items()
    }
    assert len(everything) == 3000 and crack_share == pytest.approx(454 / 3000)
    for split in SPLITS:
        rows = tables[split].select(["label", "surface"]).to_pylist()
        assert len(rows) / 3000 == pytest.approx(
            {"train": 0.7, "val": 0.15, "test": 0.15}[split], abs=0.05
        )
        assert np.mean([r["label"] for r in rows]) == pytest.approx(crack_share, abs=0.05)
        for surface, share in surface_share.items():
            got = sum(r["surface"] == surface for r in rows) / len(rows)
            assert got == pytest.approx(share, abs=0.05), (split, surface)


def test_sdnet_manifest_counts_equal_shard_counts(sdnet):
    out, manifest, tables = sdnet
    for split in SPLITS:
        rows = tables[split].select(["label", "surface"]).to_pylist()
        tally = Counter((r["surface"], r["label"]) for r in rows)
        for surface, counts in manifest["counts"][split].items():
            assert counts == {"crack": tally[surface, 1], "no_crack": tally[surface, 0]}
        crack = sum(r["label"] for r in rows)
        assert manifest["totals"][split] == {
            "samples": len(rows),
            "crack": crack,
            "no_crack": len(rows) - crack,
        }
    assert verify_dataset(out) == manifest == read_manifest(out)
    assert manifest["dataset"] == "sdnet2018" and manifest["source"] == str(SDNET.resolve())
    assert manifest["quarantined"] == 0 and manifest["duplicates_dropped"] == 0
    assert manifest["label_conflicts"] == [] and manifest["has_masks"] is False
    assert manifest["created_by"].startswith("crackray ")


def test_sdnet_columns_types_and_hashes(sdnet):
    out, manifest, tables = sdnet
    for split in SPLITS:
        table = tables[split]
        assert table.schema.equals(SCHEMA)
        assert set(pc.unique(table["split"]).to_pylist()) == {split}
        assert table["mask"].null_count == len(table) and not any(table["has_mask"].to_pylist())
        for image, sha in zip(table["image"].to_pylist(), table["sha256"].to_pylist(), strict=True):
            assert hashlib.sha256(image).hexdigest() == sha
        for path, label, surface in zip(
            *(table[c].to_pylist() for c in ("path", "label", "surface")), strict=True
        ):
            top, folder, name = path.split("/")
            assert top == surface and label == (folder[0] == "C")
    first = tables["train"].slice(0, 1).to_pylist()[0]
    assert (SDNET / first["path"]).read_bytes() == first["image"]  # stored as on disk
    assert set(manifest["files"]) == {
        str(Path(p).relative_to(out)) for s in SPLITS for p in split_files(out, s)
    }


def test_sdnet_digest_depends_on_seed_only(sdnet, tmp_path):
    _, manifest, _ = sdnet
    again = prepare_sdnet2018(SDNET, tmp_path / "same", seed=0)
    other = prepare_sdnet2018(SDNET, tmp_path / "other", seed=1)
    assert again["digest"] == manifest["digest"]
    assert again["files"] == manifest["files"]  # byte-identical shards
    assert other["digest"] != manifest["digest"]


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def small_layout(tmp_path) -> Path:
    """~20 tiles in the SDNET layout: real ones when available, else synthetic JPEGs."""
    src = tmp_path / "src"
    if SDNET.is_dir():
        for folder in ("D/CD", "D/UD", "W/CW", "W/UW"):
            (src / folder).mkdir(parents=True)
            for path in sorted((SDNET / folder).glob("*.jpg"))[:5]:
                shutil.copy(path, src / folder / path.name)
        return src
    rng = np.random.default_rng(0)
    for folder in ("D/CD", "D/UD", "W/CW", "W/UW"):
        (src / folder).mkdir(parents=True)
        for i in range(5):
            image, _ = make_tile(rng, 64, crack=folder[2] == "C")
            (src / folder / f"{7000 + i % 2}-{i}.jpg").write_bytes(images.encode_jpeg(image))
    return src


def _quarantine(out: Path) -> dict[str, str]:
    with (out / "quarantine.csv").open(newline="") as handle:
        return {row["path"]: row["reason"] for row in csv.DictReader(handle)}


def test_missing_and_empty_sources_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder") as missing:
        prepare_sdnet2018(tmp_path / "nope", tmp_path / "out")
    assert str(tmp_path / "nope") in str(missing.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"D\|P\|W/C\*\|U\*"):
        prepare_sdnet2018(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_files_are_quarantined_and_the_rest_written(small_layout, tmp_path):
    good = sorted(p.relative_to(small_layout).as_posix() for p in small_layout.rglob("*.jpg"))
    victim = small_layout / good[0]
    (small_layout / "D/CD/7999-1.jpg").write_bytes(
        victim.read_bytes()[: len(victim.read_bytes()) // 3]
    )
    (small_layout / "D/UD/7999-2.jpg").write_text("not a picture, just text\n")
    (small_layout / "W/UW/notes.txt").write_text("field notes")
    (small_layout / "W/UW/.DS_Store").write_bytes(b"\0\0")  # hidden: ignored, not quarantined
    out = tmp_path / "out"
    manifest = prepare_sdnet2018(small_layout, out, val=0.2, test=0.2)
    bad = _quarantine(out)
    assert set(bad) == {"D/CD/7999-1.jpg", "D/UD/7999-2.jpg", "W/UW/notes.txt"}
    assert "cannot decode" in bad["D/CD/7999-1.jpg"]
    assert "not an image" in bad["D/UD/7999-2.jpg"]
    assert manifest["quarantined"] == 3
    written = sorted(
        row["path"] for s in SPLITS for row in read_split_table(out, s, ["path"]).to_pylist()
    )
    assert written == good


def test_byte_duplicates_dropped_and_label_conflicts_reported(small_layout, tmp_path):
    uncracked = sorted((small_layout / "W/UW").glob("*.jpg"))[0]
    cracked = sorted((small_layout / "D/CD").glob("*.jpg"))[0]
    shutil.copy(uncracked, small_layout / "W/UW/9999-1.jpg")  # same label: keep one
    shutil.copy(cracked, small_layout / "D/UD" / f"{cracked.stem}_2.jpg")  # contradicting label
    out = tmp_path / "out"
    manifest = prepare_sdnet2018(small_layout, out)
    assert manifest["duplicates_dropped"] == 1
    sha = hashlib.sha256(cracked.read_bytes()).hexdigest()
    assert manifest["label_conflicts"] == [
        {
            "sha256": sha,
            "paths": [f"D/CD/{cracked.name}", f"D/UD/{cracked.stem}_2.jpg"],
            "labels": [1, 0],
        }
    ]
    paths = [row["path"] for s in SPLITS for row in read_split_table(out, s, ["path"]).to_pylist()]
    assert f"W/UW/{uncracked.name}" in paths and "W/UW/9999-1.jpg" not in paths
    assert f"D/CD/{cracked.name}" not in paths
    assert sum(manifest["totals"][s]["samples"] for s in SPLITS) == 20 - 1


def test_bad_fractions_fail_before_reading(small_layout, tmp_path):
    from crackray.errors import ConfigError

    with pytest.raises(ConfigError, match="sum to less than 1"):
        prepare_sdnet2018(small_layout, tmp_path / "out", val=0.6, test=0.5)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def _fail_on_second_shard(monkeypatch):
    real_write, calls = shards.pq.write_table, []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first shard is on disk when the second dies
            raise OSError("disk full (simulated)")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shards.pq, "write_table", failing_write)


def _fail_after_all_shards(monkeypatch):
    def failing_quarantine(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(shards, "_write_quarantine", failing_quarantine)


@pytest.mark.faults
@pytest.mark.parametrize("inject", [_fail_on_second_shard, _fail_after_all_shards])
def test_failure_mid_write_leaves_nothing_half_written(small_layout, tmp_path, monkeypatch, inject):
    out = tmp_path / "out"
    first = prepare_sdnet2018(small_layout, out, seed=0, val=0.3, test=0.3)
    assert len(first["files"]) >= 2
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    inject(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        prepare_sdnet2018(small_layout, out, seed=1, val=0.3, test=0.3)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _siblings(out) == ["out", "src"]  # no temp folder left behind
    assert verify_dataset(out)["digest"] == first["digest"]

    monkeypatch.undo()
    inject(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        prepare_sdnet2018(small_layout, tmp_path / "fresh", seed=1, val=0.3, test=0.3)
    assert not (tmp_path / "fresh").exists() and _siblings(out) == ["out", "src"]


def test_replaces_a_dataset_whole_but_refuses_foreign_folders(small_layout, tmp_path):
    out = tmp_path / "out"
    first = prepare_sdnet2018(small_layout, out, seed=0, val=0.3, test=0.3)
    second = prepare_sdnet2018(small_layout, out, seed=5, val=0.3, test=0.3)
    assert second["digest"] != first["digest"] and verify_dataset(out) == second
    assert _siblings(out) == ["out", "src"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare_sdnet2018(small_layout, foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    assert prepare_sdnet2018(small_layout, tmp_path / "empty")["digest"]


def test_shards_are_cut_evenly(tmp_path):
    rows = [
        {
            "image": bytes([i]),
            "label": i % 2,
            "surface": "s",
            "photo_id": str(i),
            "split": "train",
            "path": f"{i:02d}.jpg",
            "sha256": hashlib.sha256(bytes([i])).hexdigest(),
        }
        for i in range(20)
    ]
    manifest = write_dataset(
        rows, tmp_path / "ds", {"dataset": "t", "source": "t", "seed": 0}, rows_per_shard=7
    )
    table = read_split_table(tmp_path / "ds", "train")
    assert len(table) == 20
    assert table["path"].to_pylist() == sorted(r["path"] for r in rows)
    sizes = [shards.pq.read_metadata(p).num_rows for p in split_files(tmp_path / "ds", "train")]
    assert sizes == [6, 7, 7] and len(manifest["files"]) == 3
    with pytest.raises(DataError, match="no val split") as err:
        split_files(tmp_path / "ds", "val")
    assert str(tmp_path / "ds" / "val") in str(err.value)
    assert read_split_table(tmp_path / "ds", "val").schema.equals(SCHEMA)
    assert len(read_split_table(tmp_path / "ds", "test", ["label"])) == 0
    assert _quarantine(tmp_path / "ds") == {}


# ---------------------------------------------------------------------------------------------
# Reading and verification


@pytest.fixture
def demo(tmp_path) -> Path:
    prepare_synthetic(tmp_path / "demo", n=60, image_size=32)
    return tmp_path / "demo"


def test_read_manifest_errors_name_the_file(demo, tmp_path):
    with pytest.raises(DataError, match="manifest.json: not found — run `crackray prepare` first"):
        read_manifest(tmp_path / "nothing")
    (demo / "manifest.json").write_text("{ truncated")
    with pytest.raises(DataError, match=r"manifest.json: corrupt") as err:
        read_manifest(demo)
    assert str(demo / "manifest.json") in str(err.value)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        split_files(demo, "dev")


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.faults
@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "corrupt shard"),
        (lambda p: p.unlink(), "missing shard"),
        # Inside an image's bytes: still valid Parquet, caught by the digest.
        (lambda p: _flip_byte(p, 100), "differs"),
        (lambda p: p.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1"), "corrupt shard"),
    ],
    ids=["truncated", "deleted", "byte-flipped", "replaced"],
)
def test_verify_names_the_tampered_shard(demo, tamper, message):
    shard = Path(split_files(demo, "train")[0])
    tamper(shard)
    with pytest.raises(DataError, match=message) as err:
        verify_dataset(demo)
    assert str(shard) in str(err.value)


@pytest.mark.faults
def test_verify_catches_a_rewritten_but_readable_shard(demo):
    shard = Path(split_files(demo, "val")[0])
    table = shards.pq.read_table(shard).slice(1)  # one row fewer, still valid Parquet
    shards.pq.write_table(table, shard)
    with pytest.raises(DataError, match="sha256 .* differs") as err:
        verify_dataset(demo)
    assert str(shard) in str(err.value)
    manifest = json.loads((demo / "manifest.json").read_text())
    manifest["files"]["val/part-00000.parquet"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (demo / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="rows in shards, but manifest.json says"):
        verify_dataset(demo)


# ---------------------------------------------------------------------------------------------
# Image helpers


def test_decode_guards_against_decompression_bombs(monkeypatch):
    data = images.encode_png(np.zeros((100, 120), np.uint8))
    with pytest.raises(DataError, match="120x100 pixels exceeds the limit of 5000"):
        images.decode_rgb(data, max_pixels=5000)
    monkeypatch.setattr(images, "MAX_PIXELS", 5000)
    with pytest.raises(DataError, match="decompression bomb"):
        images.decode_mask(data)
    assert "exceeds the limit" in images.sniff_bytes(data)


def test_decode_and_encode_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert np.array_equal(images.decode_rgb(images.encode_png(rgb)), rgb)
    resized = images.decode_rgb(images.encode_jpeg(rgb), size=32)
    assert resized.shape == (32, 32, 3) and resized.dtype == np.uint8
    grey = images.decode_rgb(images.encode_png(rgb[..., 0]))
    assert grey.shape == (40, 60, 3)
    path = tmp_path / "x.jpg"
    path.write_bytes(images.encode_jpeg(rgb))
    assert images.sniff_image(path) is None
    assert images.sniff_image(tmp_path / "absent.jpg").startswith("cannot read")
    path.write_bytes(b"")
    assert images.sniff_image(path) == "empty file"
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="GIF")
    assert "unsupported format GIF" in images.sniff_bytes(buffer.getvalue())
