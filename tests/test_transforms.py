"""The training decode path (random crop, Pillow augmentation) against independent numpy
computations of the same transforms, and the evaluation path left as it was."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crackray.data import transforms
from crackray.data.images import decode_rgb, encode_jpeg, encode_png


def _tiles(n: int, side: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode_png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _reference(arrays: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """augment's documented transforms in plain numpy: per image quarter turns then mirror,
    then (x - mean) * gain + mean + bias in float32, clipped, truncated to uint8."""
    turns = [(int(rng.integers(4)), rng.random() < 0.5) for _ in arrays]
    gain = 1.0 + strength * rng.uniform(-0.2, 0.2, size=len(arrays)).astype(np.float32)
    bias = strength * rng.uniform(-20, 20, size=len(arrays)).astype(np.float32)
    out = []
    for image, (k, flip), g, b in zip(arrays, turns, gain, bias, strict=True):
        image = np.rot90(image, k, axes=(0, 1))
        image = image[:, ::-1] if flip else image
        mean = np.float32(image.astype(np.int64).sum() / image.size)
        x = image.astype(np.float32)
        out.append(np.clip((x - mean) * g + mean + b, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize(("k", "flip"), [(k, f) for k in range(4) for f in (False, True)])
def test_pillow_transposes_equal_numpy_turns_and_mirror(k, flip):
    image = np.random.default_rng(k).integers(0, 256, (7, 7, 3), dtype=np.uint8)
    expected = np.rot90(image, k, axes=(0, 1))
    expected = expected[:, ::-1] if flip else expected
    op = transforms._TRANSPOSES[(k, flip)]
    got = Image.fromarray(image) if op is None else Image.fromarray(image).transpose(op)
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_augment_matches_the_numpy_reference():
    arrays = transforms.decode_images(_tiles(6, 40), 40)
    got, _ = transforms.augment(arrays, np.random.default_rng(7), 0.8)
    np.testing.assert_array_equal(got, _reference(arrays, np.random.default_rng(7), 0.8))


def test_augment_moves_masks_with_their_images():
    rng = np.random.default_rng(1)
    masks = (rng.random((8, 24, 24)) < 0.3).astype(np.uint8)
    images = np.repeat(masks[..., None] * 255, 3, axis=3).astype(np.uint8)
    # No colour change, so the pixels show exactly where the geometry put them.
    out, moved = transforms.augment(images, np.random.default_rng(2), 1e-9, masks)
    np.testing.assert_array_equal(out[..., 0] > 127, moved == 1)
    assert not np.array_equal(moved, masks)  # 8 random turns: some image did move


def test_training_decode_crops_tiles_then_augments_like_the_reference():
    tiles = _tiles(5, 64, seed=3)  # 64 px at 56 px: within CROP_SLACK, so cropped
    got = transforms.decode_training(tiles, 56, [np.random.default_rng(i) for i in range(5)], 1.0)
    for i, tile in enumerate(tiles):
        rng = np.random.default_rng(i)
        dx, dy = rng.random(2)
        crop = decode_rgb(tile)[int(dy * 9):int(dy * 9) + 56, int(dx * 9):int(dx * 9) + 56]
        np.testing.assert_array_equal(got[i], _reference(crop[None], rng, 1.0)[0])


def test_training_decode_with_one_shared_generator_draws_image_after_image():
    tiles = _tiles(4, 64, seed=8)
    rng = np.random.default_rng(3)
    got = transforms.decode_training(tiles, 56, [rng] * 4, 0.7)
    rng = np.random.default_rng(3)
    for i, tile in enumerate(tiles):
        dx, dy = rng.random(2)
        crop = decode_rgb(tile)[int(dy * 9):int(dy * 9) + 56, int(dx * 9):int(dx * 9) + 56]
        np.testing.assert_array_equal(got[i], _reference(crop[None], rng, 0.7)[0])


def test_training_decode_resizes_images_far_from_the_input_size():
    tiles = _tiles(3, 90, seed=4)  # 90 px at 56 px: beyond CROP_SLACK, resized as in evaluation
    got = transforms.decode_training(tiles, 56, [np.random.default_rng(5)] * 3, 0.5)
    rng = np.random.default_rng(5)
    resized = transforms.decode_images(tiles, 56)
    for i in range(3):
        rng.random(2)  # the crop offsets are drawn even where unused
        np.testing.assert_array_equal(got[i], _reference(resized[i:i + 1], rng, 0.5)[0])


def test_training_decode_without_augmentation_is_the_evaluation_decode():
    tiles = [encode_jpeg(np.random.default_rng(6).integers(0, 256, (64, 64, 3), np.uint8))]
    np.testing.assert_array_equal(
        transforms.decode_training(tiles, 56, [np.random.default_rng(0)], 0.0),
        transforms.decode_images(tiles, 56))


@pytest.mark.parametrize(("size", "image", "crops"), [
    ((256, 256), 224, True), ((224, 224), 224, True), ((257, 256), 224, False),
    ((200, 200), 224, False), ((480, 320), 224, False)])
def test_crop_only_close_to_the_input_size(size, image, crops):
    assert transforms.crops(size, image) is crops


def test_crop_boxes_stay_inside_the_image():
    for offset in ([0.0, 0.0], [0.999999, 0.5], [0.5, 0.999999]):
        left, top, right, bottom = transforms.crop_box((256, 250), 224, np.array(offset))
        assert left >= 0 and right <= 256 and top >= 0 and bottom <= 250
        assert (right - left, bottom - top) == (224, 224)
