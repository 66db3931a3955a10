"""`crackray prepare ...`: source layout -> checked, de-duplicated, split Parquet dataset.

Steps, the same for every dataset: scan the layout (catalog), read and fully decode every
file (bad ones go to quarantine, the rest are kept), optionally cut tiles, drop byte-identical
duplicates, split by photograph, write atomically (shards).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from crackray.data import catalog, shards, synthetic
from crackray.data.catalog import SourceItem
from crackray.data.images import decode_mask, decode_rgb, encode_png, sniff_bytes
from crackray.data.splits import assign_splits, split_fractions
from crackray.errors import ConfigError, DataError

Quarantine = tuple[str, str]  # (path relative to the source root, reason)


def _row(item: SourceItem, data: bytes, label: int, path: str, mask: np.ndarray | None) -> dict:
    return {
        "image": data,
        "label": label,
        "surface": item.surface,
        "photo_id": item.photo_id,
        "split": item.split,
        "path": path,
        "sha256": hashlib.sha256(data).hexdigest(),
        # Stored as 0/255 PNG whatever the source used (0/1, RGB), so readers see one format.
        "mask": None if mask is None else encode_png(mask * np.uint8(255)),
    }


def _tiles(item: SourceItem, data: bytes, mask: np.ndarray, tile: int) -> list[dict]:
    """Non-overlapping tile x tile cuts from the top-left; a remainder narrower than a tile is
    dropped. Tiles are stored as PNG: re-encoding as JPEG would blur thin cracks a second time."""
    image = decode_rgb(data)
    height, width = mask.shape
    rows = []
    for y in range(0, height - tile + 1, tile):
        for x in range(0, width - tile + 1, tile):
            cut = mask[y : y + tile, x : x + tile]
            encoded = encode_png(np.ascontiguousarray(image[y : y + tile, x : x + tile]))
            rows.append(_row(item, encoded, int(cut.any()), f"{item.rel}#{x},{y}", cut))
    return rows


def _read_mask(item: SourceItem, data: bytes) -> np.ndarray | Quarantine:
    """The item's 0/1 mask, or a quarantine entry; a size mismatch is a hard error."""
    try:
        mask_bytes = item.mask.read_bytes()
    except OSError as exc:
        return item.rel, f"mask {item.mask.name}: cannot read: {exc.strerror or exc}"
    reason = sniff_bytes(mask_bytes)
    if reason:
        return item.rel, f"mask {item.mask.name}: {reason}"
    mask = decode_mask(mask_bytes)
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    if mask.shape != (height, width):
        # Not quarantined: a misaligned mask means the whole layout is suspect.
        raise DataError(
            f"{item.mask}: mask is {mask.shape[1]}x{mask.shape[0]} "
            f"but its image {item.rel} is {width}x{height}"
        )
    return mask


def _read_item(item: SourceItem, tile: int | None) -> tuple[list[dict], Quarantine | None]:
    """Rows from one source file, or why it was quarantined."""
    if item.reason:
        return [], (item.rel, item.reason)
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        return [], (item.rel, f"cannot read: {exc.strerror or exc}")
    reason = sniff_bytes(data)
    if reason:
        return [], (item.rel, reason)
    if item.mask is None:
        return [_row(item, data, item.label, item.rel, None)], None
    mask = _read_mask(item, data)
    if isinstance(mask, tuple):
        return [], mask
    if tile is None:
        return [_row(item, data, int(mask.any()), item.rel, mask)], None
    rows = _tiles(item, data, mask, tile)
    if not rows:
        height, width = mask.shape
        return [], (item.rel, f"{width}x{height} is smaller than one {tile}x{tile} tile")
    return rows, None


def _read_all(items: list[SourceItem], tile: int | None) -> tuple[list[dict], list[Quarantine]]:
    # Pillow releases the GIL while decoding, so threads give a real speed-up here.
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda item: _read_item(item, tile), items))
    rows = [row for item_rows, _ in results for row in item_rows]
    return rows, [entry for _, entry in results if entry]


def deduplicate(rows: list[dict]) -> tuple[list[dict], int, list[dict]]:
    """Drop byte-identical copies (keep the first by path); drop all copies whose labels differ.

    Returns (kept rows, number of copies dropped, label conflicts).
    """
    by_sha: dict[str, list[dict]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["path"]):
        by_sha[row["sha256"]].append(row)
    kept, dropped, conflicts = [], 0, []
    for sha, group in by_sha.items():
        labels = [row["label"] for row in group]
        if len(set(labels)) > 1:
            # Which label is right cannot be known; keeping either would teach a wrong one.
            paths = [row["path"] for row in group]
            conflicts.append({"sha256": sha, "paths": paths, "labels": labels})
            continue
        kept.append(group[0])
        dropped += len(group) - 1
    return kept, dropped, sorted(conflicts, key=lambda c: c["paths"])


def _photos_in_several_splits(items: list[SourceItem]) -> dict[str, dict[str, int]]:
    """photo_id -> {split: crops} for each photograph whose crops a dataset's own lists put
    in more than one split (near-duplicates on both sides: the splits are not independent)."""
    crops: dict[str, Counter] = defaultdict(Counter)
    for item in items:
        if item.split is not None and item.reason is None:
            crops[item.photo_id][item.split] += 1
    return {
        photo: {split: splits[split] for split in catalog.SPLITS if split in splits}
        for photo, splits in sorted(crops.items())
        if len(splits) > 1
    }


def _warn_photos_in_several_splits(src, several: dict[str, dict[str, int]]) -> None:
    combinations = Counter("+".join(splits) for splits in several.values())
    photo, splits = next(iter(several.items()))
    warnings.warn(
        f"{src}: crops of {len(several)} source photo(s) fall in more than one of the "
        f"dataset's splits ({', '.join(f'{c}: {n}' for c, n in sorted(combinations.items()))}; "
        f"{sum(sum(s.values()) for s in several.values())} crops), kept as given, so those "
        f"splits share photographs; e.g. {photo}: "
        f"{', '.join(f'{split} {n}' for split, n in splits.items())}",
        stacklevel=4,
    )


def _prepare(
    dataset: str,
    src: str | Path,
    items: list[SourceItem],
    out: str | Path,
    val: float,
    test: float,
    seed: int,
    tile: int | None = None,
) -> dict:
    split_fractions(val, test)  # fail before reading thousands of files
    if tile is not None and tile < 16:
        raise ConfigError(f"tile must be at least 16 pixels (got {tile})")
    several = _photos_in_several_splits(items)
    if several:
        _warn_photos_in_several_splits(src, several)
    rows, quarantine = _read_all(items, tile)
    rows, dropped, conflicts = deduplicate(rows)
    if not rows:
        first = f"; first: {quarantine[0][0]}: {quarantine[0][1]}" if quarantine else ""
        raise DataError(f"{src}: none of the {len(items)} files could be used{first}")
    fixed = all(row["split"] is not None for row in rows)
    if not fixed:
        assignment = assign_splits(rows, val, test, seed)
        for row in rows:
            row["split"] = assignment[row["photo_id"]]
    extra = {
        "dataset": dataset,
        "source": str(Path(src).resolve()),
        "seed": seed,
        "val_fraction": val,
        "test_fraction": test,
        "split_method": "lists" if fixed else "photo-grouped",
        "tile": tile,
        "duplicates_dropped": dropped,
        "label_conflicts": conflicts,
        "photos_in_several_splits": several,
    }
    return shards.write_dataset(rows, out, extra, quarantine=quarantine)


def prepare_sdnet2018(
    src: str | Path, out: str | Path, val: float = 0.15, test: float = 0.15, seed: int = 0
) -> dict:
    """SDNET2018 in its original `D|P|W/C*|U*/<photo>-<tile>.jpg` layout; the manifest."""
    return _prepare("sdnet2018", src, catalog.scan_sdnet2018(src), out, val, test, seed)


def prepare_cfd(
    src: str | Path,
    out: str | Path,
    tile: int | None = None,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
) -> dict:
    """CrackForest `images/*.jpg` + `masks/*.png`. All its images hold cracks: use `tile` to get
    crack-free negatives (tiles of one image share its photo_id, hence its split)."""
    return _prepare("cfd", src, catalog.scan_cfd(src), out, val, test, seed, tile)


def prepare_crack500(
    src: str | Path,
    out: str | Path,
    tile: int | None = None,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
) -> dict:
    """CRACK500 `*.jpg` + `*.png` masks; its own train/val/test.txt lists (or train/ val/ test/
    folders), when present, fix the split, and photos whose crops they split are warned of."""
    return _prepare("crack500", src, catalog.scan_crack500(src), out, val, test, seed, tile)


def prepare_synthetic(
    out: str | Path,
    n: int = 400,
    seed: int = 0,
    image_size: int = 256,
    crack_fraction: float = 0.3,
    val: float = 0.15,
    test: float = 0.15,
) -> dict:
    """A synthetic demo dataset with masks; same format and manifest as the real ones."""
    split_fractions(val, test)
    if n < 1 or not 0.0 <= crack_fraction <= 1.0:
        raise ConfigError(f"need n >= 1 and 0 <= crack_fraction <= 1 (got {n}, {crack_fraction})")
    rows = synthetic.make_rows(n, seed, image_size, crack_fraction)
    assignment = assign_splits(rows, val, test, seed)
    for row in rows:
        row["split"] = assignment[row["photo_id"]]
    extra = {
        "dataset": "synthetic",
        "source": "synthetic",
        "seed": seed,
        "val_fraction": val,
        "test_fraction": test,
        "split_method": "photo-grouped",
        "tile": None,
        "duplicates_dropped": 0,
        "label_conflicts": [],
        "photos_in_several_splits": {},  # split by photo by construction
    }
    return shards.write_dataset(rows, out, extra)
