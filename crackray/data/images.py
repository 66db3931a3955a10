"""Safe image decode/encode helpers: the only place that turns bytes into pixels and back.

Every decode checks the pixel count from the header *before* decoding, so a tiny file that
claims to be 100k x 100k pixels (a decompression bomb) is refused instead of eating memory.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from crackray.errors import DataError

# Largest width * height we decode. Module-level so a deployment can raise it in one place;
# 40 MP covers full-resolution camera photos (SDNET2018 sources are ~16 MP).
MAX_PIXELS = 40_000_000
# What the `image` column may hold: the pipeline decodes exactly these.
STORED_FORMATS = ("JPEG", "PNG")


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Open (header only) and refuse images above the pixel limit."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own, stricter check beyond 2x its limit
        raise DataError(f"{exc} (exceeds crackray's limit of {limit} pixels)") from None
    width, height = image.size
    if width * height > limit:
        image.close()
        raise DataError(
            f"image of {width}x{height} pixels exceeds the limit of {limit} "
            "(possible decompression bomb; raise crackray.data.images.MAX_PIXELS if genuine)"
        )
    return image


# The name deploy/tiling.py imports; open_image is the public one.
_open_checked = open_image


def binarize(mask: np.ndarray) -> np.ndarray:
    """0/1 uint8 from a stored mask: 0/255 (threshold at half) or already 0/1."""
    threshold = 127 if mask.max(initial=0) > 1 else 0
    return (mask > threshold).astype(np.uint8)


def decode_rgb(data: bytes, size: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """uint8 HxWx3; resized to size x size (bilinear) when `size` is given."""
    with open_image(data, max_pixels) as image:
        return np.asarray(resized_rgb(image, size), dtype=np.uint8)


def resized_rgb(image: Image.Image, size: int | None) -> Image.Image:
    """An opened image as RGB, resized to size x size (bilinear) when `size` is given."""
    if size is not None and image.format == "JPEG":
        # Lets libjpeg decode at 1/2, 1/4 or 1/8 scale: full photos shrink far faster. (A 256 px
        # tile at 224 px gains nothing: only whole fractions exist, so it decodes at full size.)
        image.draft("RGB", (size, size))
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return rgb


def decode_mask(data: bytes, size: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """uint8 HxW of 0/1; nearest-neighbour resize so the mask stays binary."""
    with open_image(data, max_pixels) as image:
        grey = image.convert("L")
    if size is not None and grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.NEAREST)
    return binarize(np.asarray(grey))


def _to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected uint8 HxW or HxWx3, got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 HxW (greyscale) or HxWx3 (RGB) array; lossless."""
    buffer = io.BytesIO()
    _to_pil(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    _to_pil(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def sniff_bytes(data: bytes, formats: tuple[str, ...] = STORED_FORMATS) -> str | None:
    """Why `data` is not a usable image, or None when it decodes completely."""
    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in formats:
                return f"unsupported format {image.format} (expected {' or '.join(formats)})"
            image.verify()  # structural checks (PNG CRCs); cheap, but misses truncated JPEGs
        # verify() leaves the image unusable, so reopen for a real decode of every pixel.
        with open_image(data, None) as image:
            image.load()
    except DataError as exc:
        return str(exc)
    except UnidentifiedImageError:
        return "not an image (unrecognised file format)"
    except Exception as exc:  # Pillow raises many types on malformed input; all mean "bad file"
        return f"cannot decode: {type(exc).__name__}: {exc}"
    return None


def sniff_image(path: str | Path) -> str | None:
    """Why the file at `path` is not a decodable image, or None when it is fine."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return sniff_bytes(data)
