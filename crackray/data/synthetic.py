"""Synthetic concrete tiles with pixel masks: a demo dataset that needs no download.

The tiles are made to be *not* trivially separable: brightness, tint, stains, shadows and
gradients vary independently of the label, and crack-free tiles carry hard negatives (straight
joints, dark spots) that a model must learn to tell from thin, branching, irregular cracks.
"""

from __future__ import annotations

import hashlib
from itertools import pairwise

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from crackray.data.images import encode_jpeg, encode_png


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a cells x cells random grid upsampled bilinearly to size x size."""
    grid = rng.random((cells, cells), dtype=np.float32)
    grid_image = Image.fromarray(grid, mode="F")
    return np.asarray(grid_image.resize((size, size), Image.Resampling.BILINEAR))


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return xs - 0.5, ys - 0.5


def _concrete(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey level (float32 HxW): multi-scale noise, grain and aggregate specks around a base."""
    grey = np.full((size, size), rng.uniform(95, 185), dtype=np.float32)
    for cells, amplitude in ((4, rng.uniform(8, 24)), (16, rng.uniform(5, 12)), (64, 6.0)):
        grey += amplitude * (_smooth_noise(rng, size, cells) - 0.5)
    grey += rng.normal(0, rng.uniform(2, 7), (size, size)).astype(np.float32)
    # Aggregate: 2x2 specks, lighter or darker than the paste around them.
    half = (size + 1) // 2
    specks = (rng.random((half, half)) < rng.uniform(0.005, 0.04)) * rng.normal(0, 28, (half, half))
    grey += np.kron(specks, np.ones((2, 2)))[:size, :size].astype(np.float32)
    return grey


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multiplicative shading (HxW): gradients, a soft shadow edge, a stain — or none."""
    xs, ys = _coords(size)
    shade = np.ones((size, size), dtype=np.float32)
    if rng.random() < 0.5:  # uneven illumination
        angle = rng.uniform(0, 2 * np.pi)
        shade *= 1 + rng.uniform(0.05, 0.25) * (np.cos(angle) * xs + np.sin(angle) * ys)
    if rng.random() < 0.2:  # a cast shadow: half-plane with a soft edge
        angle, offset = rng.uniform(0, 2 * np.pi), rng.uniform(-0.3, 0.3)
        side = (np.cos(angle) * xs + np.sin(angle) * ys - offset) * size / rng.uniform(2, 12)
        shade *= 1 - rng.uniform(0.15, 0.4) / (1 + np.exp(-side))
    if rng.random() < 0.25:  # a damp or rust stain: a low-frequency blob
        blob = np.clip((_smooth_noise(rng, size, 3) - 0.55) * 4, 0, 1)
        shade *= 1 - rng.uniform(0.1, 0.3) * blob
    return shade


def _walk(
    rng: np.random.Generator, start: np.ndarray, angle: float, steps: int, size: int
) -> list[tuple[float, float]]:
    """A random walk that meanders around a general direction (mean-reverting, so no loops)."""
    points = [tuple(start)]
    position = start.astype(float)
    deviation = 0.0
    for _ in range(steps):
        deviation = 0.8 * deviation + rng.normal(0, 0.3)
        step = rng.uniform(3, 7) * np.array([np.cos(angle + deviation), np.sin(angle + deviation)])
        position = position + step
        points.append(tuple(position))
        if not (-8 <= position[0] <= size + 8 and -8 <= position[1] <= size + 8):
            break
    return points


def _draw_crack(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """One crack: a walk both ways from an inner point, 1-3 px wide, with a few branches."""
    start = rng.uniform(0.2 * size, 0.8 * size, 2)
    angle = rng.uniform(0, 2 * np.pi)
    steps = int(size / 2.5)
    backward = _walk(rng, start, angle + np.pi, steps, size)
    path = backward[::-1] + _walk(rng, start, angle, steps, size)[1:]
    width = int(rng.integers(1, 4))
    for a, b in pairwise(path):
        # Cracks narrow and widen along their length.
        draw.line([a, b], fill=255, width=max(1, width + int(rng.integers(-1, 2))))
    for _ in range(rng.poisson(1.2)):
        origin = np.array(path[int(rng.integers(0, len(path)))])
        branch_angle = angle + rng.choice([-1, 1]) * rng.uniform(0.4, 1.2)
        branch = _walk(rng, origin, branch_angle, int(rng.integers(4, 20)), size)
        draw.line(branch, fill=255, width=max(1, width - 1), joint="curve")


def _hard_negatives(rng: np.random.Generator, size: int) -> np.ndarray:
    """Darkening (HxW in [0,1]) from crack look-alikes: a straight joint and/or dark spots."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.5:  # a saw-cut joint or formwork edge: long, straight, even width
        if rng.random() < 0.5:
            x = rng.uniform(0.1, 0.9) * size
            ends = [(x, -2), (x + rng.uniform(-0.1, 0.1) * size, size + 2)]
        else:
            y = rng.uniform(0.1, 0.9) * size
            ends = [(-2, y), (size + 2, y + rng.uniform(-0.1, 0.1) * size)]
        draw.line(ends, fill=int(rng.integers(90, 200)), width=int(rng.integers(3, 8)))
    for _ in range(int(rng.integers(0, 5))):  # voids and oil spots
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(2, 12, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(rng.integers(80, 200)))
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32) / 255


def make_tile(
    rng: np.random.Generator, size: int = 256, crack: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxWx3 image, uint8 HxW mask, 255 = crack); the mask is empty iff not `crack`."""
    grey = _concrete(rng, size) * _lighting(rng, size)
    # Crack tiles get look-alikes too (less often), so their presence is no label cue.
    if rng.random() < (0.25 if crack else 0.6):
        grey *= 1 - 0.5 * _hard_negatives(rng, size)
    mask = Image.new("L", (size, size), 0)
    if crack:
        draw = ImageDraw.Draw(mask)
        for _ in range(1 if rng.random() < 0.8 else 2):
            _draw_crack(rng, draw, size)
        # Soft edges and a depth that varies along the crack, as in photographs.
        soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32) / 255
        depth = rng.uniform(0.35, 0.7) * (0.6 + 0.4 * _smooth_noise(rng, size, 8))
        grey *= 1 - depth * np.clip(soft * 1.5, 0, 1)
    # Concrete is near-grey: a faint warm or cool cast, not a colour.
    tint = 1 + rng.normal(0, 0.01, 3) + np.array([0.03, 0.0, -0.03]) * rng.uniform(-1, 1)
    image = np.clip(grey[..., None] * tint.astype(np.float32), 0, 255).astype(np.uint8)
    return image, np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8)


def make_rows(n: int, seed: int, image_size: int, crack_fraction: float) -> list[dict]:
    """n encoded tiles (JPEG image, PNG mask) as shard rows without a split.

    Exactly round(n * crack_fraction) tiles are cracked, so small demo sets keep their balance.
    Each tile is its own photograph: unlike real tiles, synthetic ones share no content.
    """
    rng = np.random.default_rng(seed)
    cracked = rng.permutation(n) < round(n * crack_fraction)
    rows = []
    for index, crack in enumerate(cracked):
        image, mask = make_tile(rng, image_size, crack=bool(crack))
        data = encode_jpeg(image)
        rows.append(
            {
                "image": data,
                "label": int(crack),
                "surface": "concrete",
                "photo_id": f"syn{index:05d}",
                "path": f"synthetic/{index:05d}.jpg",
                "sha256": hashlib.sha256(data).hexdigest(),
                "mask": encode_png(mask),
            }
        )
    return rows
