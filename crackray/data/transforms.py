"""Batch decode and augmentation in numpy: shared by the Ray Data pipeline, the plain-torch
benchmark baseline and prediction, so that all three see exactly the same pixels.

Augmentation stays in uint8 numpy on the ingest side; the float conversion and ImageNet
normalisation happen in `to_model_input` on the consuming worker, which keeps the bytes that
travel between Ray processes four times smaller.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch

from crackray.data.images import decode_mask, decode_rgb

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


def augment(
    images: np.ndarray, rng: np.random.Generator, strength: float, masks: np.ndarray | None = None
):
    """Flips, 90-degree rotations (cracks have no preferred orientation) and mild colour
    jitter scaled by `strength` in [0, 1]. Masks get the same geometric transforms."""
    if strength <= 0:
        return images, masks
    images = images.copy()
    masks = None if masks is None else masks.copy()
    for i in range(len(images)):
        k = int(rng.integers(4))
        flip = rng.random() < 0.5
        images[i] = _geometric(images[i], k, flip)
        if masks is not None:
            masks[i] = _geometric(masks[i], k, flip)
    # Brightness / contrast jitter: up to +-20 % at full strength, per image.
    n = len(images)
    gain = 1.0 + strength * rng.uniform(-0.2, 0.2, size=(n, 1, 1, 1)).astype(np.float32)
    bias = strength * rng.uniform(-20, 20, size=(n, 1, 1, 1)).astype(np.float32)
    mean = images.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float32)
    # (x - mean) * gain + mean + bias, in place in one float buffer: the same arithmetic in
    # the same order without four temporary copies of the batch.
    jittered = images.astype(np.float32)
    jittered -= mean
    jittered *= gain
    jittered += mean
    jittered += bias
    return np.clip(jittered, 0, 255, out=jittered).astype(np.uint8), masks


def _geometric(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    array = np.rot90(array, k, axes=(0, 1))
    return np.ascontiguousarray(array[:, ::-1] if flip else array)


def to_model_input(images: np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float32 (B, 3, H, W) in channels-last memory layout."""
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
    # Normalise whole (W * 3) rows against tiled statistics: the same arithmetic as broadcasting
    # over the size-3 channel axis, but 2-3x faster (torch's inner loop was 3 elements long).
    b, h, w, c = tensor.shape
    mean = torch.as_tensor(np.tile(MEAN, w), device=tensor.device)
    std = torch.as_tensor(np.tile(STD, w), device=tensor.device)
    rows = tensor.reshape(b, h, w * c).float().sub_(mean).div_(std)
    return rows.view(b, h, w, c).permute(0, 3, 1, 2)  # NHWC storage == channels_last NCHW
