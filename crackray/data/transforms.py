"""Batch decode and augmentation (Pillow, numpy): shared by the Ray Data pipeline, the
plain-torch benchmark baseline and prediction, so that all three see exactly the same pixels.

The ingest side decodes, crops and turns images in uint8 and draws each image's colour jitter;
the float conversion, the jitter and the ImageNet normalisation happen together in
`to_model_input` on the consuming worker. The bytes that travel between Ray processes stay four
times smaller than floats, and the per-pixel arithmetic runs where the model runs: one pass of
torch over the batch (on a GPU, for nothing) instead of a histogram and a lookup table per
image on the decoding cores.

Training images take a cheaper road than evaluation ones (`decode_training`): a random crop
instead of a resize where the stored tile is barely larger than the model's input, and the
flips and rotations done by Pillow on the decoded image (a transpose in C) before its single
copy into the batch (README "Performance").
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from crackray.data.images import decode_mask, decode_rgb, open_image, resized_rgb

# ImageNet statistics: torchvision's pretrained weights expect them, and they are harmless for
# models trained from scratch.
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0


def decode_images(images, size: int) -> np.ndarray:
    """Encoded bytes -> uint8 array (B, size, size, 3)."""
    return np.stack([decode_rgb(data, size) for data in images])


def decode_masks(masks, size: int, dilate: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """PNG mask bytes (None where absent) -> uint8 (B, size, size) in {0, 1} and has_mask (B,)."""
    out = np.zeros((len(masks), size, size), dtype=np.uint8)
    has = np.zeros(len(masks), dtype=bool)
    for i, data in enumerate(masks):
        if data is not None:
            out[i] = decode_mask(data, size)
            has[i] = True
    if dilate > 1:
        from scipy.ndimage import binary_dilation

        kernel = np.ones((dilate, dilate), dtype=bool)
        for i in np.flatnonzero(has):
            out[i] = binary_dilation(out[i], structure=kernel).astype(np.uint8)
    return out, has


def weak_label_keep(sha256: str, fraction: float) -> bool:
    """Whether a positive keeps its mask under mixed supervision.

    Decided by the image's hash, not a random draw, so the same images stay fully labelled in
    every epoch, on every worker and after a resume.
    """
    if fraction >= 1.0:
        return True
    bucket = int(hashlib.sha256(sha256.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


# (quarter turns k, mirror) -> the one Pillow transpose equal to np.rot90(a, k) then a[:, ::-1]
# (tests/test_transforms.py checks all eight).
_TRANSPOSES = {
    (0, False): None,
    (0, True): Image.Transpose.FLIP_LEFT_RIGHT,
    (1, False): Image.Transpose.ROTATE_90,
    (1, True): Image.Transpose.TRANSVERSE,
    (2, False): Image.Transpose.ROTATE_180,
    (2, True): Image.Transpose.FLIP_TOP_BOTTOM,
    (3, False): Image.Transpose.ROTATE_270,
    (3, True): Image.Transpose.TRANSPOSE,
}
# A training image at most this much larger than the model's input is random-cropped to it
# instead of resized: SDNET's 256 px tiles at 224 px lose 1/8 of each side, no more than the
# flips and jitter already vary. Much larger images (whole photos) are resized, as in evaluation.
CROP_SLACK = 8 / 7


class _Draws:
    """One batch's random augmentation parameters, drawn in a fixed order (per image: quarter
    turns, then mirror; then every gain, then every bias), so that any two implementations fed
    the same generator state produce the same pixels."""

    def __init__(self, rng: np.random.Generator, n: int, strength: float):
        self.turns = [(int(rng.integers(4)), bool(rng.random() < 0.5)) for _ in range(n)]
        # Brightness / contrast jitter: up to +-20 % at full strength, per image.
        gain = 1.0 + strength * rng.uniform(-0.2, 0.2, size=n).astype(np.float32)
        bias = strength * rng.uniform(-20, 20, size=n).astype(np.float32)
        self.jitter = np.stack([gain, bias], axis=1)

    def turn(self, image: Image.Image, i: int) -> Image.Image:
        op = _TRANSPOSES[self.turns[i]]
        return image if op is None else image.transpose(op)


def augment(
    images: np.ndarray, rng: np.random.Generator, strength: float, masks: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Flips and 90-degree rotations (cracks have no preferred orientation) of uint8 images and
    their masks, and each image's mild colour jitter scaled by `strength` in [0, 1], returned as
    (gain, bias) rows for `to_model_input` to apply: (images, masks, jitter). Without
    augmentation the jitter is None."""
    if strength <= 0:
        return images, masks, None
    draws = _Draws(rng, len(images), strength)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = np.asarray(draws.turn(Image.fromarray(image), i))
    if masks is not None:
        masks = np.stack([_geometric(mask, *draws.turns[i]) for i, mask in enumerate(masks)])
    return out, masks, draws.jitter


def decode_training(images, size: int, rngs: Sequence[np.random.Generator],
                    strength: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Encoded bytes -> (uint8 (B, size, size, 3), jitter (B, 2)) for training, one generator
    per image (the same generator may repeat): image i and its jitter are those of
    `augment(crop_or_resize(decode(images[i]), rngs[i]), rngs[i], strength)`, the turn done on
    the decoded Pillow image before its one copy into the batch.

    Each image first draws its crop offsets (two uniforms, drawn even where the image is
    resized instead), then `augment`'s parameters. With `strength` 0 (no augmentation asked
    for) this is `decode_images`, with no crop and no jitter.
    """
    if strength <= 0:
        return decode_images(images, size), None
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    jitter = np.empty((len(images), 2), dtype=np.float32)
    for i, (data, rng) in enumerate(zip(images, rngs, strict=True)):
        offset = rng.random(2)
        draws = _Draws(rng, 1, strength)
        with open_image(data) as image:
            if crops(image.size, size):
                tile = image.crop(crop_box(image.size, size, offset))
                tile = tile if tile.mode == "RGB" else tile.convert("RGB")
            else:
                tile = resized_rgb(image, size)
            out[i] = np.asarray(draws.turn(tile, 0))
        jitter[i] = draws.jitter[0]
    return out, jitter


def crops(image_size: tuple[int, int], size: int) -> bool:
    """Whether a training image of (width, height) is random-cropped to `size` (else resized)."""
    return all(size <= side <= size * CROP_SLACK for side in image_size)


def crop_box(image_size: tuple[int, int], size: int, offset: np.ndarray) -> tuple[int, ...]:
    """The (left, top, right, bottom) window of a crop; `offset` in [0, 1) per axis."""
    left, top = (int(u * (side - size + 1)) for u, side in zip(offset, image_size, strict=True))
    return left, top, left + size, top + size


def _geometric(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    array = np.rot90(array, k, axes=(0, 1))
    return np.ascontiguousarray(array[:, ::-1] if flip else array)


def to_model_input(images: np.ndarray | torch.Tensor, device=None,
                   jitter: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float32 (B, 3, H, W) in channels-last memory layout.

    With `jitter` ((B, 2) gain and bias rows from `augment` / `decode_training`) each image x
    first becomes clip((x - mean(x)) * gain + mean(x) + bias, 0, 255): contrast about the
    image's own mean brightness, then brightness, in float (no rounding to uint8 between).
    """
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        # Ray hands out read-only views. Nothing writes to this tensor (`.float()` below
        # copies), so skip torch's warning instead of copying the batch.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.as_tensor(images)
    else:
        tensor = torch.as_tensor(images)
    if device is not None:
        tensor = tensor.to(device, non_blocking=True)
    b, h, w, c = tensor.shape
    rows = tensor.reshape(b, h, w * c).float()
    scale, shift, white = _row_normalisation(w, tensor.device)
    if jitter is None:
        torch.addcmul(shift, rows, scale, out=rows)
    else:
        gain, bias = torch.as_tensor(jitter, device=tensor.device).float().T.reshape(2, b, 1, 1)
        offset = rows.mean(dim=(1, 2), keepdim=True) * (1 - gain) + bias
        # The jitter and the normalisation as one affine map per image and column; the clip to
        # [0, 255] moves with it to normalised units (the scale is positive).
        torch.addcmul(offset * scale + shift, rows, gain * scale, out=rows).clamp_(shift, white)
    return rows.view(b, h, w, c).permute(0, 3, 1, 2)  # NHWC storage == channels_last NCHW


@functools.lru_cache(maxsize=16)
def _row_normalisation(width: int, device: torch.device):
    """(scale, shift, white) over a whole image row of `width` RGB pixels: x * scale + shift
    is (x - MEAN) / STD, and shift and white are where 0 and 255 land. Whole (W * 3) rows
    against tiled statistics are the same arithmetic as broadcasting over the size-3 channel
    axis, but 2-3x faster (torch's inner loop was 3 elements long)."""
    return tuple(torch.as_tensor(np.tile(values, width), device=device)
                 for values in (1.0 / STD, -MEAN / STD, (255 - MEAN) / STD))
