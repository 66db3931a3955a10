"""The training decode path (random crop, Pillow turns, the colour jitter drawn) and the model
input (jitter and normalisation in torch) against independent numpy computations of the same
transforms, and the evaluation path left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from crackray.data import transforms
from crackray.data.images import decode_rgb, encode_jpeg, encode_png


def _tiles(n: int, side: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode_png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _reference(arrays: np.ndarray, rng: np.random.Generator, strength: float):
    """augment's documented draws in plain numpy: per image quarter turns then mirror, applied;
    then every gain, then every bias, returned as (gain, bias) rows."""
    turns = [(int(rng.integers(4)), rng.random() < 0.5) for _ in arrays]
    gain = 1.0 + strength * rng.uniform(-0.2, 0.2, size=len(arrays)).astype(np.float32)
    bias = strength * rng.uniform(-20, 20, size=len(arrays)).astype(np.float32)
    out = []
    for image, (k, flip) in zip(arrays, turns, strict=True):
        image = np.rot90(image, k, axes=(0, 1))
        out.append(image[:, ::-1] if flip else image)
    return np.stack(out), np.stack([gain, bias], axis=1)


def _model_input(image: np.ndarray, jitter=None) -> np.ndarray:
    """One uint8 HxWx3 image as the model sees it, in float64 numpy: the colour jitter
    clip((x - mean) * gain + mean + bias, 0, 255), then ImageNet normalisation, CHW."""
    x = image.astype(np.float64)
    if jitter is not None:
        gain, bias = jitter
        x = np.clip((x - x.mean()) * gain + x.mean() + bias, 0, 255)
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    return ((x - mean) / std).transpose(2, 0, 1)


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
    got, _, jitter = transforms.augment(arrays, np.random.default_rng(7), 0.8)
    expected, expected_jitter = _reference(arrays, np.random.default_rng(7), 0.8)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(jitter, expected_jitter)


def test_model_input_applies_the_jitter_then_normalises_like_numpy():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
    images[0] = 250  # bright: a positive bias saturates at 255
    images[1, :6] = 0  # half black: strong contrast clips at 0
    jitter = np.array([[1.0, 30.0], [1.6, 0.0], [0.8, -20.0], [1.0, 0.0], [1.2, 5.5]],
                      dtype=np.float32)
    got = transforms.to_model_input(images, jitter=jitter)
    assert got.is_contiguous(memory_format=torch.channels_last)
    expected = np.stack([_model_input(image, j) for image, j in zip(images, jitter, strict=True)])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    # The saturated image is flat white.
    np.testing.assert_allclose(got[0].numpy(), _model_input(np.full_like(images[0], 255)),
                               atol=1e-5)
    plain = transforms.to_model_input(images)
    np.testing.assert_allclose(plain.numpy(), np.stack([_model_input(i) for i in images]),
                               atol=1e-5)
    np.testing.assert_allclose(got[3].numpy(), plain[3].numpy(), atol=1e-5)  # gain 1, bias 0


def test_augment_moves_masks_with_their_images():
    rng = np.random.default_rng(1)
    masks = (rng.random((8, 24, 24)) < 0.3).astype(np.uint8)
    images = np.repeat(masks[..., None] * 255, 3, axis=3).astype(np.uint8)
    # The colour jitter is applied later (to_model_input): the pixels show where the turns put them.
    out, moved, _ = transforms.augment(images, np.random.default_rng(2), 1.0, masks)
    np.testing.assert_array_equal(out[..., 0] > 127, moved == 1)
    assert not np.array_equal(moved, masks)  # 8 random turns: some image did move


def test_training_decode_crops_tiles_then_augments_like_the_reference():
    tiles = _tiles(5, 64, seed=3)  # 64 px at 56 px: within CROP_SLACK, so cropped
    got, jitter = transforms.decode_training(
        tiles, 56, [np.random.default_rng(i) for i in range(5)], 1.0)
    for i, tile in enumerate(tiles):
        rng = np.random.default_rng(i)
        dx, dy = rng.random(2)
        crop = decode_rgb(tile)[int(dy * 9):int(dy * 9) + 56, int(dx * 9):int(dx * 9) + 56]
        expected, expected_jitter = _reference(crop[None], rng, 1.0)
        np.testing.assert_array_equal(got[i], expected[0])
        np.testing.assert_array_equal(jitter[i], expected_jitter[0])


def test_training_decode_with_one_shared_generator_draws_image_after_image():
    tiles = _tiles(4, 64, seed=8)
    rng = np.random.default_rng(3)
    got, jitter = transforms.decode_training(tiles, 56, [rng] * 4, 0.7)
    rng = np.random.default_rng(3)
    for i, tile in enumerate(tiles):
        dx, dy = rng.random(2)
        crop = decode_rgb(tile)[int(dy * 9):int(dy * 9) + 56, int(dx * 9):int(dx * 9) + 56]
        expected, expected_jitter = _reference(crop[None], rng, 0.7)
        np.testing.assert_array_equal(got[i], expected[0])
        np.testing.assert_array_equal(jitter[i], expected_jitter[0])


def test_training_decode_resizes_images_far_from_the_input_size():
    tiles = _tiles(3, 90, seed=4)  # 90 px at 56 px: beyond CROP_SLACK, resized as in evaluation
    got, jitter = transforms.decode_training(tiles, 56, [np.random.default_rng(5)] * 3, 0.5)
    rng = np.random.default_rng(5)
    resized = transforms.decode_images(tiles, 56)
    for i in range(3):
        rng.random(2)  # the crop offsets are drawn even where unused
        expected, expected_jitter = _reference(resized[i:i + 1], rng, 0.5)
        np.testing.assert_array_equal(got[i], expected[0])
        np.testing.assert_array_equal(jitter[i], expected_jitter[0])


def test_training_decode_without_augmentation_is_the_evaluation_decode():
    tiles = [encode_jpeg(np.random.default_rng(6).integers(0, 256, (64, 64, 3), np.uint8))]
    images, jitter = transforms.decode_training(tiles, 56, [np.random.default_rng(0)], 0.0)
    np.testing.assert_array_equal(images, transforms.decode_images(tiles, 56))
    assert jitter is None


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


@pytest.mark.parametrize("with_masks", [False, True])
def test_training_batches_reach_the_model_jittered(with_masks):
    """prepare_batch draws each row's jitter from the row's key (with masks too, where images
    are resized and turned with them), and to_torch applies it."""
    from crackray.data.batches import prepare_batch, to_torch

    n = 4
    batch = {"image": np.array(_tiles(n, 64, seed=9), dtype=object),
             "label": np.array([1, 0, 1, 0]), "surface": np.array(["D"] * n, dtype=object),
             "path": np.array([f"t{i}.png" for i in range(n)], dtype=object),
             "sha256": np.array([f"{i:064x}" for i in range(n)], dtype=object),
             "key": np.arange(10, 10 + n)}
    if with_masks:
        batch["mask"] = np.array([encode_png(np.zeros((64, 64), np.uint8))] * n, dtype=object)
        batch["has_mask"] = np.ones(n, dtype=bool)
    out = prepare_batch(batch, image_size=56, augment_strength=1.0, with_masks=with_masks)
    for i, key in enumerate(batch["key"]):
        rng = np.random.default_rng(key)
        if not with_masks:
            rng.random(2)  # crop offsets
        _, expected_jitter = _reference(out["image"][i:i + 1], rng, 1.0)
        np.testing.assert_array_equal(out["jitter"][i], expected_jitter[0])
    model_input = to_torch(out, None)["image"].numpy()
    expected = np.stack([_model_input(image, j) for image, j in zip(out["image"], out["jitter"],
                                                                  strict=True)])
    np.testing.assert_allclose(model_input, expected, atol=1e-5)
