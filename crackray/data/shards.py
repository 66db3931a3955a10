"""The prepared-dataset format: Parquet shards per split, a manifest, a quarantine list.

    DIR/manifest.json                   what was written, from where, how split, file digests
    DIR/quarantine.csv                  source files left out and why (always present)
    DIR/{train,val,test}/part-NNNNN.parquet

A split without rows gets no folder: `split_files` says so, `read_split_table` returns an
empty table. The manifest, not a directory listing, is the authority on which shards exist,
so a stray file dropped into a split folder is never read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import crackray
from crackray.data.splits import SPLITS, dataset_digest
from crackray.errors import DataError

SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),  # encoded JPEG/PNG bytes, as on disk
        pa.field("label", pa.int8(), nullable=False),  # 1 = crack (the positive class)
        pa.field("surface", pa.string(), nullable=False),
        pa.field("photo_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # relative to the source root
        pa.field("sha256", pa.string(), nullable=False),  # of the image bytes
        pa.field("mask", pa.binary()),  # PNG, 0/255, same HxW as image; null: no mask
        pa.field("has_mask", pa.bool_(), nullable=False),
    ]
)
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"
# ~2000 SDNET tiles of ~9 KB make ~20 MB shards: big enough for fast sequential reads, small
# enough that Ray Data spreads a split over several read tasks.
ROWS_PER_SHARD = 2000
ROW_GROUP_SIZE = 500  # bounds the memory one reader holds at a time
# Images and masks are already compressed; compressing them again costs CPU on every read.
_COMPRESSION = {name: ("none" if name in ("image", "mask") else "zstd") for name in SCHEMA.names}
_REQUIRED_KEYS = ("dataset", "source", "seed", "counts", "totals", "digest", "files")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing


def _table(rows: Sequence[dict]) -> pa.Table:
    columns = {name: [row.get(name) for row in rows] for name in SCHEMA.names}
    columns["has_mask"] = [row.get("mask") is not None for row in rows]
    for name in SCHEMA.names:
        if not SCHEMA.field(name).nullable and any(value is None for value in columns[name]):
            raise ValueError(f"every row needs a value for '{name}'")
    return pa.table(columns, schema=SCHEMA)


def _write_shards(rows: Sequence[dict], root: Path, rows_per_shard: int) -> dict[str, str]:
    """Write every split's rows (sorted by path, so output is reproducible); rel path -> sha256."""
    files = {}
    for split in SPLITS:
        split_rows = sorted((r for r in rows if r["split"] == split), key=lambda r: r["path"])
        # Equal-sized shards (2101 rows -> 1051 + 1050, not 2000 + 101) balance read tasks.
        count = -(-len(split_rows) // rows_per_shard)
        bounds = [len(split_rows) * i // count for i in range(count + 1)] if count else []
        for number, (start, stop) in enumerate(pairwise(bounds)):
            rel = f"{split}/part-{number:05d}.parquet"
            (root / split).mkdir(exist_ok=True)
            pq.write_table(
                _table(split_rows[start:stop]),
                root / rel,
                row_group_size=ROW_GROUP_SIZE,
                compression=_COMPRESSION,
            )
            files[rel] = _sha256_file(root / rel)
    return files


def _write_quarantine(path: Path, quarantine: Iterable[tuple[str, str]]) -> int:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        entries = sorted(quarantine)
        writer.writerows(entries)
    return len(entries)


def _counts(rows: Sequence[dict]) -> tuple[dict, dict]:
    """Per split x surface class counts and per split totals (zeros included for every split)."""
    tally = Counter((r["split"], r["surface"], int(r["label"])) for r in rows)
    surfaces = sorted({r["surface"] for r in rows})
    counts = {
        split: {s: {"crack": tally[split, s, 1], "no_crack": tally[split, s, 0]} for s in surfaces}
        for split in SPLITS
    }
    totals = {}
    for split in SPLITS:
        crack = sum(c["crack"] for c in counts[split].values())
        no_crack = sum(c["no_crack"] for c in counts[split].values())
        totals[split] = {"samples": crack + no_crack, "crack": crack, "no_crack": no_crack}
    return counts, totals


def _is_crackray_dataset(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("created_by", "")).startswith("crackray")


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_crackray_dataset(out):
        raise DataError(
            f"{out}: folder is not empty and holds no crackray dataset; refusing to overwrite it "
            "(choose another output folder or empty this one)"
        )


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames, so readers see the old dataset or the new one."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
        else:
            out.rmdir()
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dataset(
    rows: list[dict],
    out_dir: str | Path,
    manifest_extra: dict,
    *,
    quarantine: Iterable[tuple[str, str]] = (),
    rows_per_shard: int = ROWS_PER_SHARD,
) -> dict:
    """Write rows (dicts with SCHEMA's keys; `has_mask` is derived) atomically; the manifest.

    Everything is written into a temporary folder beside `out_dir` and renamed into place at
    the end, so a failure leaves either the previous dataset or nothing, never half of one.
    """
    out = Path(out_dir).absolute()
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = _write_shards(rows, tmp, rows_per_shard)
        quarantined = _write_quarantine(tmp / QUARANTINE, quarantine)
        counts, totals = _counts(rows)
        manifest = {
            **manifest_extra,
            "counts": counts,
            "totals": totals,
            "digest": dataset_digest(rows),
            "files": files,
            "quarantined": quarantined,
            "has_masks": any(r.get("mask") is not None for r in rows),
            "created_by": f"crackray {crackray.__version__}",
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found — run `crackray prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: corrupt ({exc}) — re-run `crackray prepare`") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: corrupt (not a JSON object) — re-run `crackray prepare`")
    missing = [key for key in _REQUIRED_KEYS if key not in manifest]
    if missing:
        keys = ", ".join(missing)
        raise DataError(f"{path}: corrupt (missing {keys}) — re-run `crackray prepare`")
    return manifest


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")


def split_files(data_dir: str | Path, split: str) -> list[str]:
    """Absolute paths of a split's shards, in order."""
    _check_split(split)
    root = Path(data_dir).absolute()
    rels = sorted(rel for rel in read_manifest(root)["files"] if rel.split("/")[0] == split)
    if not rels:
        raise DataError(f"{root / split}: no shards — this dataset has no {split} split")
    for rel in rels:
        if not (root / rel).is_file():
            raise DataError(f"{root / rel}: missing shard (listed in {MANIFEST})")
    return [str(root / rel) for rel in rels]


def _shard_problem(path: Path, expected_sha: str) -> str | None:
    """What is wrong with one shard, or None."""
    if not path.is_file():
        return f"missing shard (listed in {MANIFEST})"
    actual = _sha256_file(path)
    try:
        # On a mismatch, read all of it to tell a corrupt file from a rewritten one.
        schema = pq.read_table(path).schema if actual != expected_sha else pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        return f"corrupt shard, pyarrow cannot read it ({exc})"
    if actual != expected_sha:
        return f"sha256 {actual[:12]}… differs from {expected_sha[:12]}… in {MANIFEST}"
    if not schema.equals(SCHEMA):
        return "columns differ from this crackray's schema — re-run `crackray prepare`"
    return None


def verify_dataset(data_dir: str | Path) -> dict:
    """Check every shard against the manifest's digests and row counts; the manifest."""
    root = Path(data_dir).absolute()
    manifest = read_manifest(root)
    rows = Counter()
    for rel, expected in sorted(manifest["files"].items()):
        problem = _shard_problem(root / rel, expected)
        if problem:
            raise DataError(f"{root / rel}: {problem}")
        rows[rel.split("/")[0]] += pq.read_metadata(root / rel).num_rows
    for split in SPLITS:
        expected = manifest["totals"].get(split, {}).get("samples", 0)
        if rows[split] != expected:
            raise DataError(
                f"{root / split}: {rows[split]} rows in shards, but {MANIFEST} says {expected}"
            )
    return manifest


def read_split_table(
    data_dir: str | Path, split: str, columns: list[str] | None = None
) -> pa.Table:
    """A whole split as one in-memory table (for small data: tests, select, report)."""
    _check_split(split)
    if read_manifest(data_dir)["totals"].get(split, {}).get("samples", 0) == 0:
        return SCHEMA.empty_table().select(columns or SCHEMA.names)
    tables = [pq.read_table(path, columns=columns) for path in split_files(data_dir, split)]
    return pa.concat_tables(tables)
