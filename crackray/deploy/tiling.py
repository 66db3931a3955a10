"""Image bytes -> model inputs, and window results -> whole-photo results: the one
preprocessing that `crackray predict` and the served MLflow model share.

An image that fits in a tile (both sides <= tile) is a tile: it is decoded at the model's
image size exactly as evaluation decodes a stored tile, so it gets the probability evaluation
gave it. A larger image is a photo: it is cut into tile x tile windows at `stride` (a last
window flush with each edge), each resized like a tile. A photo strip narrower than a tile is
padded (mirrored) to a full window rather than squashed. EXIF orientation is applied first,
so windows, maps and masks are upright as the camera meant.

A photo's probability is its highest window's (cracked if any window is); its probability
map and its segmentation mask average the windows covering each pixel.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crackray.data.images import _open_checked
from crackray.errors import DataError

# Formats decoded from untrusted bytes: the camera / scanner ones. Some other Pillow plugins
# shell out on load (EPS runs Ghostscript), so they are refused from the header.
DECODED_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TILE = "tile"
WINDOW = "window"


def decode_upright(data: bytes, size: int | None = None) -> np.ndarray:
    """uint8 HxWx3, EXIF-rotated, resized to size x size (bilinear) when `size` is given.

    For an image without an EXIF rotation these are exactly `decode_rgb`'s pixels (the same
    JPEG draft scale, conversion and resize), so predict matches evaluation."""
    try:
        with _open_checked(data, None) as image:
            if image.format not in DECODED_FORMATS:
                raise DataError(f"unsupported image format {image.format} "
                                f"(expected {', '.join(DECODED_FORMATS)})")
            if size is not None and image.format == "JPEG":
                image.draft("RGB", (size, size))  # libjpeg's fast 1/2..1/8-scale decode
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError("not an image (unrecognised file format)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken files
        raise DataError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def upright_size(data: bytes) -> tuple[int, int]:
    """(width, height) after the EXIF rotation, from the header alone."""
    try:
        with _open_checked(data, None) as image:
            width, height = image.size
            # Orientations 5-8 turn the image by 90 degrees (EXIF tag 0x0112).
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError("not an image (unrecognised file format)") from None
    except Exception as exc:  # noqa: BLE001 - see decode_upright
        raise DataError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    return width, height


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): a last window flush with the edge if needed; a
    side shorter than a tile gets one (padded) window."""
    starts = list(range(0, max(length - tile, 0) + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _resize(window: np.ndarray, size: int) -> np.ndarray:
    """The same bilinear resize that `decode_rgb` applies to a stored tile."""
    if window.shape[:2] == (size, size):
        return np.ascontiguousarray(window)
    image = Image.fromarray(window).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _pad_to(window: np.ndarray, tile: int) -> np.ndarray:
    """Mirror-pad a cut narrower than a tile: squashing would change the crack scale the
    model was trained at, and a constant border reads as a dark edge."""
    h, w = window.shape[:2]
    if (h, w) == (tile, tile):
        return window
    return np.pad(window, ((0, tile - h), (0, tile - w), (0, 0)), mode="symmetric")


def pieces_from_bytes(data: bytes, *, image_size: int, tile: int, stride: int) -> list[dict]:
    """The model inputs of one image: one `tile` piece, or one `window` piece per window of a
    photo. Each piece: kind, x, y, width, height (its region of the upright image: a tile's
    is the whole image), image_width, image_height, count (pieces of this image), image
    (uint8 image_size x image_size x 3). Raises DataError for unusable bytes."""
    if not data:
        raise DataError("empty file")
    width, height = upright_size(data)
    if width <= tile and height <= tile:
        return [{"kind": TILE, "x": 0, "y": 0, "width": width, "height": height,
                 "image_width": width, "image_height": height, "count": 1,
                 "image": decode_upright(data, image_size)}]
    rgb = decode_upright(data)
    cuts = [(x, y) for y in window_starts(height, tile, stride)
            for x in window_starts(width, tile, stride)]
    pieces = []
    for x, y in cuts:
        cut = rgb[y : y + tile, x : x + tile]
        pieces.append({"kind": WINDOW, "x": x, "y": y, "width": cut.shape[1],
                       "height": cut.shape[0], "image_width": width, "image_height": height,
                       "count": len(cuts), "image": _resize(_pad_to(cut, tile), image_size)})
    return pieces


# ------------------------------------------------------------------------- whole images


def image_probability(pieces: list[dict]) -> float:
    """A photo is cracked if any window is: its probability is the highest window's."""
    return max(float(p["probability"]) for p in pieces)


def probability_map(pieces: list[dict]) -> np.ndarray:
    """Mean probability of the windows covering each pixel (float32, height x width)."""
    first = pieces[0]
    total = np.zeros((first["image_height"], first["image_width"]), np.float32)
    count = np.zeros_like(total)
    for p in pieces:
        region = (slice(p["y"], p["y"] + p["height"]), slice(p["x"], p["x"] + p["width"]))
        total[region] += p["probability"]
        count[region] += 1
    return total / np.maximum(count, 1)


def stitched_seg(pieces: list[dict], tile: int) -> np.ndarray:
    """Segmentation maps (uint8 0..255 at the model's size, key `seg`) -> one float 0..1 map
    of the whole image, averaging where windows overlap."""
    first = pieces[0]
    if first["kind"] == TILE:  # its map covers the whole image
        return _resize_map(first["seg"], first["width"], first["height"])
    total = np.zeros((first["image_height"], first["image_width"]), np.float32)
    count = np.zeros_like(total)
    for p in pieces:
        h, w = p["height"], p["width"]
        # The padded part of a narrow strip's window lies outside the image: cropped off.
        window = _resize_map(p["seg"], tile, tile)[:h, :w]
        total[p["y"] : p["y"] + h, p["x"] : p["x"] + w] += window
        count[p["y"] : p["y"] + h, p["x"] : p["x"] + w] += 1
    return total / np.maximum(count, 1)


def _resize_map(seg: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 0..255 map -> float 0..1 map of the given size."""
    image = Image.fromarray(np.ascontiguousarray(seg)).resize((width, height),
                                                              Image.Resampling.BILINEAR)
    return np.asarray(image, np.float32) / 255.0


class Gatherer:
    """Collects scored pieces, which may arrive in any order (Ray Data), and hands back each
    image's pieces once all of them are in, so only unfinished images are held."""

    def __init__(self):
        self._open: dict[int, list[dict]] = {}

    def add(self, piece: dict) -> list[dict] | None:
        pieces = self._open.setdefault(piece["index"], [])
        pieces.append(piece)
        if len(pieces) < piece["count"]:
            return None
        del self._open[piece["index"]]
        return sorted(pieces, key=lambda p: (p["y"], p["x"]))
