"""Read dataset layouts on disk into a flat list of source items (no pixels decoded here).

Each reader knows one published layout and says which layout it expected when a folder
does not match, so a user pointing `crackray prepare` at the wrong folder learns why.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from crackray.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SourceItem:
    """One image on disk and what its layout says about it."""

    path: Path  # absolute
    rel: str  # relative to the source root, with '/' separators
    surface: str
    photo_id: str
    label: int | None = None  # None: derive it from the mask
    mask: Path | None = None
    split: str | None = None  # fixed by the dataset's own lists; None: assign by photo
    reason: str | None = None  # set: quarantine this item instead of reading it


def _require_folder(src: Path) -> Path:
    if not src.is_dir():
        raise DataError(f"{src}: no such folder")
    return src.resolve()


def _visible_files(folder: Path) -> list[Path]:
    # Hidden files (.DS_Store, ._foo.jpg from macOS copies) are filesystem noise, not data.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def scan_sdnet2018(src: str | Path) -> list[SourceItem]:
    """SDNET2018 layout `D|P|W/C*|U*/<photo>-<tile>.jpg`; label from C (crack) / U (uncracked)."""
    root = _require_folder(Path(src))
    items = []
    for surface in ("D", "P", "W"):
        surface_dir = root / surface
        if not surface_dir.is_dir():
            continue
        for class_dir in sorted(surface_dir.iterdir()):
            if not class_dir.is_dir() or class_dir.name[:1] not in ("C", "U"):
                continue
            label = 1 if class_dir.name.startswith("C") else 0
            for path in _visible_files(class_dir):
                rel = path.relative_to(root).as_posix()
                # Only the file name carries the photograph: '7002-117.jpg' -> '7002'.
                photo_id = path.stem.split("-", 1)[0]
                reason = None
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    reason = f"not an image file name (suffix '{path.suffix}')"
                items.append(SourceItem(path, rel, surface, photo_id, label, reason=reason))
    if not items:
        raise DataError(
            f"{root}: no SDNET2018 images found; expected the layout "
            "D|P|W/C*|U*/<photo>-<tile>.jpg (e.g. D/CD/7001-12.jpg)"
        )
    return items


def scan_cfd(src: str | Path) -> list[SourceItem]:
    """CrackForest layout `images/<id>.jpg` + `masks/<id>.png`; label comes from the mask."""
    root = _require_folder(Path(src))
    image_dir, mask_dir = root / "images", root / "masks"
    images = (
        [p for p in _visible_files(image_dir) if p.suffix.lower() in IMAGE_SUFFIXES]
        if image_dir.is_dir()
        else []
    )
    if not images or not mask_dir.is_dir():
        raise DataError(
            f"{root}: no CrackForest images found; expected images/<id>.jpg with masks/<id>.png"
        )
    items = []
    for path in images:
        mask = mask_dir / f"{path.stem}.png"
        reason = None if mask.is_file() else f"no mask masks/{mask.name}"
        items.append(
            SourceItem(
                path,
                path.relative_to(root).as_posix(),
                "pavement",
                path.stem,
                mask=mask if reason is None else None,
                reason=reason,
            )
        )
    return items


# CRACK500 crops are named <photo>_<row>_<col>; strip that suffix so crops of one photograph
# share a photo_id and never straddle two splits.
_CROP_SUFFIX = re.compile(r"^(.*?)(_\d+_\d+)?$")


def crack500_photo_id(stem: str) -> str:
    return _CROP_SUFFIX.match(stem).group(1) or stem


def _mask_index(root: Path) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.png")):
        index.setdefault(path.stem, []).append(path)
    return index


def _find_mask(image: Path, index: dict[str, list[Path]]) -> Path | None:
    """The mask of the same stem (or `<stem>_mask`, as some CRACK500 copies name it)."""
    for stem in (image.stem, f"{image.stem}_mask"):
        candidates = index.get(stem, [])
        same_folder = [p for p in candidates if p.parent == image.parent]
        if same_folder:
            return same_folder[0]
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            names = ", ".join(str(p) for p in candidates)
            raise DataError(f"{image}: ambiguous mask, several files named {stem}.png: {names}")
    return None


def _read_lists(root: Path) -> dict[str, tuple[str, str | None, str]]:
    """image rel path -> (mask rel path or None, split, list file) from train/val/test.txt."""
    listed: dict[str, tuple[str, str | None, str]] = {}
    for split in SPLITS:
        list_file = root / f"{split}.txt"
        if not list_file.is_file():
            continue
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            image = fields[0].removeprefix("./").lstrip("/")
            if image in listed:
                raise DataError(
                    f"{list_file}:{number}: {image} is already listed in {listed[image][2]}"
                )
            mask = fields[1].removeprefix("./").lstrip("/") if len(fields) > 1 else None
            listed[image] = (mask, split, list_file.name)
    return listed


def _folder_split(rel: str) -> str | None:
    """The split a top-level train/, val/ or test/ folder gives an image below it."""
    top, _, rest = rel.partition("/")
    return top.lower() if rest and top.lower() in SPLITS else None


def scan_crack500(src: str | Path) -> list[SourceItem]:
    """CRACK500: `*.jpg` + same-stem `*.png` masks anywhere under SRC.

    The dataset's own split is used as given: train.txt / val.txt / test.txt when SRC holds
    them, else top-level train/ val/ test/ folders; images that it does not place are left
    out, with a warning. With neither, the split is assigned by photograph later.
    """
    root = _require_folder(Path(src))
    index = _mask_index(root)
    listed = _read_lists(root)
    images = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg") and not p.name.startswith(".")
    )
    folder_splits = {p: _folder_split(p.relative_to(root).as_posix()) for p in images}
    if listed:
        pairs = [
            (root / image, root / mask if mask else None, split)
            for image, (mask, split, _) in listed.items()
        ]
        given_by = "train.txt / val.txt / test.txt"
    elif any(folder_splits.values()):
        pairs = [(p, None, split) for p, split in folder_splits.items() if split]
        given_by = "the train/ val/ test/ folders"
    else:
        pairs = [(p, None, None) for p in images]
        given_by = None
    if not pairs:
        raise DataError(
            f"{root}: no CRACK500 images found; expected <name>.jpg with a <name>.png mask "
            "anywhere below it (optionally listed in train.txt / val.txt / test.txt, or in "
            "train/ val/ test/ folders)"
        )
    left_out = len(set(images) - {image for image, _, _ in pairs})
    if given_by and left_out:
        warnings.warn(
            f"{root}: {left_out} of {len(images)} CRACK500 images are not placed by {given_by} "
            "and are left out",
            stacklevel=2,
        )
    items = []
    for image, mask, split in sorted(pairs, key=lambda pair: pair[0]):
        reason = None
        if not image.is_file():
            reason = f"listed in {split}.txt but not found"
        else:
            mask = mask or _find_mask(image, index)
            if mask is None or not mask.is_file():
                reason = f"no mask {mask.relative_to(root) if mask else image.stem + '.png'}"
        items.append(
            SourceItem(
                image,
                image.relative_to(root).as_posix(),
                "pavement",
                crack500_photo_id(image.stem),
                mask=None if reason else mask,
                split=split,
                reason=reason,
            )
        )
    return items
