"""Rows of a prepared split -> model-ready batches: decode, resize, augment (numpy), then torch
tensors on a device, where the colour jitter drawn with the augmentation is applied. No Ray: the
Ray pipeline maps `prepare_batch` over its blocks, and in-process evaluation (`inference.py`)
calls the same two functions, so both see the same pixels."""

from __future__ import annotations

import numpy as np
import torch

from crackray.data import transforms

COLUMNS = ["image", "label", "surface", "path", "sha256"]
MASK_COLUMNS = ["mask", "has_mask"]


def prepare_batch(
    batch: dict[str, np.ndarray],
    *,
    image_size: int,
    augment_strength: float,
    with_masks: bool = False,
    dilate: int = 1,
    segmented_fraction: float = 1.0,
) -> dict[str, np.ndarray]:
    """One map_batches step: decode, resize and (for training) augment a batch of rows.

    Augmented batches carry `jitter`, each image's colour jitter for `to_torch` to apply.

    Training images (`augment_strength` > 0) are random-cropped where the tile allows and
    augmented in one pass (`transforms.decode_training`); with masks (segdec) they are
    resized and augmented together with their masks, which must stay aligned.

    Rows of a training epoch carry `key` (`epochs.training_epoch`), which seeds each row's own
    generator: a row's crop and augmentation in an epoch do not depend on which task, worker
    or batch it lands in, so a resumed run augments as the uninterrupted one did. Without
    `key` (the plain-DataLoader benchmark baseline) one unseeded generator serves the batch.
    """
    n = len(batch["image"])
    if "key" in batch:
        rngs = [np.random.default_rng(int(key)) for key in batch["key"]]
    else:
        rngs = [np.random.default_rng()] * n
    augmenting = augment_strength > 0
    jitter = None
    if augmenting and not with_masks:
        images, jitter = transforms.decode_training(
            batch["image"], image_size, rngs, augment_strength)
    else:
        images = transforms.decode_images(batch["image"], image_size)
    out = {
        "label": batch["label"].astype(np.float32),
        "surface": batch["surface"],
        "path": batch["path"],
    }
    if with_masks:
        masks, has_mask = transforms.decode_masks(batch["mask"], image_size, dilate)
        # Negatives have an all-zero mask by definition; positives keep theirs only for the
        # fully supervised fraction (mixed supervision).
        is_negative = out["label"] == 0
        keep = np.array(
            [transforms.weak_label_keep(h, segmented_fraction) for h in batch["sha256"]]
        )
        out["has_mask"] = is_negative | (has_mask & keep)
        if augmenting:
            jitter = np.empty((n, 2), dtype=np.float32)
            for i, rng in enumerate(rngs):
                row = slice(i, i + 1)
                images[row], masks[row], jitter[row] = transforms.augment(
                    images[row], rng, augment_strength, masks[row]
                )
        out["mask"] = masks
    out["image"] = images
    if jitter is not None:
        out["jitter"] = jitter
    return out


def to_torch(batch: dict[str, np.ndarray], device) -> dict:
    """A decoded numpy batch -> torch tensors on `device`: `image` colour-jittered (if the
    batch carries `jitter`) and normalised, float NCHW (channels_last memory); `label` float;
    masks if present; string columns (`surface`, `path`) stay numpy arrays for per-surface
    metrics and error galleries."""
    out = {
        "image": transforms.to_model_input(batch["image"], device, batch.get("jitter")),
        # np.asarray: the benchmark's DataLoader hands the label over as a tensor already.
        "label": torch.tensor(np.asarray(batch["label"]), device=device),
        "surface": np.asarray(batch["surface"], dtype=object),
        "path": np.asarray(batch["path"], dtype=object),
    }
    if "mask" in batch:
        out["mask"] = torch.tensor(batch["mask"], device=device)
        out["has_mask"] = torch.tensor(batch["has_mask"], device=device)
    return out
