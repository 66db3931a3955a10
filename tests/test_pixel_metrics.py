"""Pixel metrics with a distance tolerance, on hand-made masks, and scored at the masks' own
resolution by the in-process evaluation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from scipy import ndimage

from crackray.config import load_experiment
from crackray.data.images import decode_mask
from crackray.data.prepare import prepare_cfd
from crackray.data.shards import read_split_table
from crackray.data.splits import TEST
from crackray.data.transforms import to_model_input
from crackray.evaluation import pixel_split_metrics
from crackray.inference import predict_split
from crackray.metrics import pixel_counts, pixel_metrics, sweep_pixel_threshold
from crackray.models import create_model

SEGDEC_SPACE = REPO / "search_spaces" / "segdec_crack.yaml"


def _line(row, shape=(20, 20), cols=slice(3, 17)):
    mask = np.zeros(shape, dtype=bool)
    mask[row, cols] = True
    return mask


@pytest.mark.parametrize("shift", [1, 2])
def test_prediction_within_tolerance_counts_fully(shift):
    gt, pred = _line(8), _line(8 + shift)
    assert pixel_counts(pred, gt, tolerance=2) == (14, 14, 14, 14)
    m = pixel_metrics([pred.astype(float)], [gt], threshold=0.5, tolerance=2)
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0)
    assert m["dice"] == 0.0 and m["iou"] == 0.0  # plain overlap has no tolerance


def test_prediction_beyond_tolerance_counts_nothing():
    gt, pred = _line(8), _line(11)
    assert pixel_counts(pred, gt, tolerance=2) == (0, 14, 0, 14)
    m = pixel_metrics([pred.astype(float)], [gt], threshold=0.5, tolerance=2)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)


def test_tolerance_is_euclidean():
    gt = np.zeros((9, 9), dtype=bool)
    gt[4, 4] = True
    pred = np.zeros_like(gt)
    pred[6, 5] = True  # sqrt(5) = 2.24 away
    assert pixel_counts(pred, gt, tolerance=2)[0] == 0
    assert pixel_counts(pred, gt, tolerance=2.3)[0] == 1


def test_recall_is_against_raw_gt():
    gt = _line(8)
    pred = _line(8, cols=slice(3, 8))  # covers 5 of 14 GT pixels, reaches 2 more
    tp_pred, n_pred, tp_gt, n_gt = pixel_counts(pred, gt, tolerance=2)
    assert (tp_pred, n_pred, n_gt) == (5, 5, 14)
    assert tp_gt == 7


def test_counts_match_brute_force_distances():
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt, pred = rng.random((16, 16)) < 0.1, rng.random((16, 16)) < 0.1
        gt_pts, pred_pts = np.argwhere(gt), np.argwhere(pred)
        d = np.sqrt(((pred_pts[:, None] - gt_pts[None]) ** 2).sum(-1))
        expected = ((d.min(1) <= 2).sum(), len(pred_pts), (d.min(0) <= 2).sum(), len(gt_pts))
        assert pixel_counts(pred, gt, tolerance=2) == tuple(int(x) for x in expected)
        assert ndimage.distance_transform_edt(~gt)[pred].min() == pytest.approx(d.min())


def test_empty_masks():
    empty = np.zeros((10, 10), dtype=bool)
    assert pixel_counts(empty, _line(5, (10, 10), slice(2, 8))) == (0, 0, 0, 6)
    assert pixel_counts(_line(5, (10, 10), slice(2, 8)), empty) == (0, 6, 0, 0)
    m = pixel_metrics([empty.astype(float)], [empty], threshold=0.5)
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["images"] == 1


def test_pooled_and_per_image_f1():
    gt_a, gt_b = _line(8), _line(4)
    pred_a = _line(8).astype(float)  # perfect
    pred_b = np.zeros((20, 20))  # misses everything
    negative = np.zeros((20, 20), dtype=bool)
    m = pixel_metrics([pred_a, pred_b, negative.astype(float)], [gt_a, gt_b, negative], 0.5)
    assert m["precision"] == 1.0 and m["recall"] == 0.5
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["f1_per_image"] == pytest.approx(0.5)  # over the two images with cracks
    assert m["dice"] == pytest.approx(2 * 14 / (14 + 28))
    assert m["iou"] == pytest.approx(14 / 28)


def test_sweep_picks_a_threshold_separating_crack_from_background():
    rng = np.random.default_rng(1)
    gts, preds = [], []
    for row in (5, 9, 13):
        gt = _line(row)
        prob = rng.uniform(0.0, 0.4, gt.shape)  # background
        prob[gt] = rng.uniform(0.6, 0.9, gt.sum())  # cracks
        gts.append(gt)
        preds.append(prob)
    threshold, m = sweep_pixel_threshold(preds, gts, tolerance=0)
    assert 0.4 <= threshold <= 0.6
    assert m["f1"] == 1.0 and m["threshold"] == threshold
    assert pixel_metrics(preds, gts, threshold, tolerance=0) == m
    low = pixel_metrics(preds, gts, 0.1, tolerance=0)
    assert low["recall"] == 1.0 and low["precision"] < 0.5


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes"):
        pixel_counts(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


# ---------------------------------------------------------------------------------------------
# The SegDec "2 pixel distance" protocol


def _segdec(preds, gts, threshold, tolerance=2):
    return pixel_metrics(preds, gts, threshold, tolerance=tolerance, protocol="segdec")


def test_segdec_on_hand_made_masks():
    gt = np.zeros((11, 11), dtype=bool)
    gt[5, 3:7] = True  # a 4 px crack, (5, 3) .. (5, 6)
    prob = np.zeros((11, 11), dtype=np.float32)
    prob[5, 4] = 0.9  # on the crack: tp
    prob[7, 5] = 0.8  # 2 px straight below (5, 5), on the cross: tp
    prob[5, 8] = 0.7  # 2 px right of the crack's end, on the cross: tp
    prob[6, 7] = 0.9  # diagonal neighbour of (5, 6) at distance 1: the cross misses it, fp
    prob[3, 8] = 0.9  # diagonal of (5, 6) at distance 2: fp
    prob[5, 5] = 0.5  # exactly at the threshold: not predicted, so (5, 5) is missed
    # Missed crack pixels: (5, 3), (5, 5), (5, 6); tp 3, fp 2, fn 3.
    precision_a, recall_a = 3 / 5, 3 / 6
    f1_a = 2 * precision_a * recall_a / (precision_a + recall_a)

    crack_free = np.zeros((11, 11), dtype=bool)
    speckle = np.zeros((11, 11), dtype=np.float32)
    speckle[2, 2] = 0.9  # counts 0 however it is scored
    perfect = gt.astype(np.float32)

    m = _segdec([prob], [gt], 0.5)
    assert (m["precision"], m["recall"]) == pytest.approx((precision_a, recall_a))
    assert m["f1"] == pytest.approx(f1_a)
    preds = [prob, speckle, crack_free.astype(np.float32), perfect]
    m = _segdec(preds, [gt, crack_free, crack_free, gt], 0.5)
    assert m["precision"] == pytest.approx((precision_a + 1) / 4)
    assert m["recall"] == pytest.approx((recall_a + 1) / 4)
    assert m["f1"] == pytest.approx((f1_a + 1) / 4)
    assert (m["images"], m["crack_images"], m["threshold"]) == (4, 2, 0.5)
    # The symmetric metric's Euclidean disk reaches the distance-1 diagonal: it is no fp there.
    assert pixel_counts(prob > 0.5, gt, tolerance=2)[0] == 4


def test_segdec_recall_gives_missed_pixels_no_tolerance():
    gt, pred = _line(8), _line(9).astype(np.float32)  # one row off: every prediction is near
    m = _segdec([pred], [gt], 0.5)
    assert (m["precision"], m["recall"]) == (1.0, 0.5)  # tp 14, fp 0, fn 14
    assert m["f1"] == pytest.approx(2 / 3)
    assert _segdec([pred], [gt], 0.5, tolerance=0)["f1"] == 0.0  # tp 0: all zero


def test_segdec_cross_grows_with_tolerance():
    gt = np.zeros((15, 15), dtype=bool)
    gt[7, 7] = True
    for tolerance in (1, 2, 3):
        prob = np.zeros((15, 15), dtype=np.float32)
        prob[7, 7] = prob[7, 7 + tolerance] = prob[7 - tolerance, 7] = 1.0  # centre, arm ends: tp
        prob[7 + tolerance + 1, 7] = prob[8, 8] = 1.0  # one past an arm, a diagonal: fp
        m = _segdec([prob], [gt], 0.5, tolerance)
        assert (m["precision"], m["recall"]) == (3 / 5, 1.0)
    with pytest.raises(ValueError, match="whole number"):
        _segdec([prob], [gt], 0.5, tolerance=1.5)


def test_segdec_threshold_is_strict_at_8_bit_levels():
    # The evaluation's maps are 8-bit levels k/255 in float32; 51/255 is 0.2 in float32.
    gt = _line(8)
    prob = np.where(gt, np.float32(51) / np.float32(255), np.float32(0))
    assert _segdec([prob], [gt], 0.2)["f1"] == 0.0
    assert _segdec([prob], [gt], 0.195)["f1"] == 1.0
    _, swept = sweep_pixel_threshold([prob], [gt], thresholds=[0.195, 0.2], protocol="segdec")
    assert swept == _segdec([prob], [gt], 0.195)


def _reference_segdec(preds, gts, threshold, tolerance=2):
    """The protocol written out from its definition, one image and one threshold at a time."""
    precisions, recalls, f1s = [], [], []
    for prob, gt in zip(preds, gts, strict=True):
        pred = prob > threshold
        # A (2k+1) cross = a vertical and a horizontal (2k+1) line, dilated separately.
        size = 2 * tolerance + 1
        gt_d = ndimage.maximum_filter1d(gt, size, axis=0, mode="constant") | (
            ndimage.maximum_filter1d(gt, size, axis=1, mode="constant")
        )
        tp = np.sum(pred & gt_d)
        fp = np.sum(pred & ~gt_d)
        fn = np.sum(gt & ~pred)
        p = tp / (tp + fp) if tp > 0 else 0.0
        r = tp / (tp + fn) if tp > 0 else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p > 0 and r > 0 else 0.0)
    return np.mean(precisions), np.mean(recalls), np.mean(f1s)


def _random_maps(seed, n=6, shape=(24, 32), quantised=False):
    """Blurred random cracks and noisy probabilities; one image crack-free."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for i in range(n):
        gt = np.zeros(shape, dtype=bool)
        if i:
            gt = ndimage.binary_dilation(rng.random(shape) < 0.02, iterations=rng.integers(0, 2))
        near_crack = ndimage.uniform_filter(gt.astype(float), 3)
        prob = np.clip(0.6 * near_crack + 0.5 * rng.random(shape), 0, 1)
        if quantised:
            prob = np.round(prob * 255).astype(np.uint8).astype(np.float32) / 255.0
        preds.append(prob)
        gts.append(gt)
    return preds, gts


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("tolerance", [0, 2])
def test_segdec_matches_an_independent_implementation(quantised, tolerance):
    preds, gts = _random_maps(seed=tolerance + 10 * quantised, quantised=quantised)
    for threshold in (0.1, 0.3, 0.5, 0.6, 0.8):
        m = _segdec(preds, gts, threshold, tolerance)
        expected = _reference_segdec(preds, gts, threshold, tolerance)
        assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("quantised", [False, True])
def test_segdec_sweep_picks_the_brute_force_threshold(quantised):
    preds, gts = _random_maps(seed=3, quantised=quantised)
    grid = np.round(np.arange(1, 200) * 0.005, 3)
    f1s = [_reference_segdec(preds, gts, t)[2] for t in grid]
    threshold, m = sweep_pixel_threshold(preds, gts, protocol="segdec")
    assert threshold == grid[int(np.argmax(f1s))]  # argmax: the first, lowest, of equal F1s
    assert m["f1"] == pytest.approx(max(f1s), abs=1e-12)
    assert m == _segdec(preds, gts, threshold)


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="Only symmetric, segdec"):
        pixel_metrics([np.zeros((4, 4))], [np.zeros((4, 4), bool)], 0.5, protocol="pooled")


def test_split_metrics_report_both_protocols_with_validation_thresholds():
    from crackray.engine import EvalOutputs
    from crackray.evaluation import pixel_split_metrics

    def outputs(seed):  # maps stored as the evaluation stores them: 8-bit levels
        preds, gts = _random_maps(seed)
        maps = [np.round(p * 255).astype(np.uint8) for p in preds]
        return EvalOutputs(seg_probs=maps, masks=[g.astype(np.uint8) for g in gts])

    val, test = outputs(5), outputs(6)
    threshold, val_metrics = pixel_split_metrics(val, "val")
    val_preds = [m.astype(np.float32) / 255.0 for m in val.seg_probs]
    val_gts = [m.astype(bool) for m in val.masks]
    segdec_threshold, segdec = sweep_pixel_threshold(val_preds, val_gts, protocol="segdec")
    assert threshold == sweep_pixel_threshold(val_preds, val_gts)[0]
    assert val_metrics["val/pixel_threshold"] == threshold
    assert val_metrics["val/segdec_threshold"] == segdec_threshold
    assert val_metrics["val/segdec_f1"] == segdec["f1"]

    _, test_metrics = pixel_split_metrics(test, "test", threshold, segdec_threshold)
    test_preds = [m.astype(np.float32) / 255.0 for m in test.seg_probs]
    test_gts = [m.astype(bool) for m in test.masks]
    expected = _reference_segdec(test_preds, test_gts, segdec_threshold)
    got = tuple(test_metrics[f"test/segdec_{k}"] for k in ("precision", "recall", "f1"))
    assert got == pytest.approx(expected, abs=1e-12)
    assert test_metrics["test/segdec_threshold"] == segdec_threshold
    # Without the validation segdec threshold a test split reports no segdec metric at all.
    _, symmetric_only = pixel_split_metrics(test, "test", threshold)
    assert not any("segdec" in key for key in symmetric_only)
    assert symmetric_only == {k: v for k, v in test_metrics.items() if "segdec" not in k}


# ------------------------------------------------------------ scoring at the masks' resolution

THIN_SIZE, TRAIN_SIZE = 64, 16
THIN_COLUMN = 1  # a nearest-neighbour 64 -> 16 shrink samples columns 2, 6, 10, ...: not this one


def thin_crack_dataset(root: Path, photos: int = 14) -> Path:
    """A prepared CrackForest-layout dataset of 64 px photos; two in three hold a 1-px vertical
    crack that a nearest-neighbour shrink to 16 px loses entirely, the rest are crack-free."""
    src, rng = root / "src", np.random.default_rng(0)
    for folder in ("images", "masks"):
        (src / folder).mkdir(parents=True)
    for i in range(photos):
        rgb = rng.integers(0, 256, (THIN_SIZE, THIN_SIZE, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(src / "images" / f"{i:03d}.jpg")
        mask = np.zeros((THIN_SIZE, THIN_SIZE), np.uint8)
        mask[:, THIN_COLUMN] = 255 if i % 3 else 0
        Image.fromarray(mask).save(src / "masks" / f"{i:03d}.png")
    prepare_cfd(src, root / "data")
    return root / "data"


def thin_crack_config(data: Path, **overrides):
    return load_experiment(SEGDEC_SPACE, {"data.path": str(data), "data.image_size": TRAIN_SIZE,
                                          "model.name": "segdec_tiny", **overrides}).base


def test_pixel_metrics_are_scored_at_the_masks_own_resolution(tmp_path):
    data = thin_crack_dataset(tmp_path)
    stored = read_split_table(data, TEST, ["mask"]).column("mask").to_pylist()
    assert stored and all(decode_mask(m, TRAIN_SIZE).sum() == 0 for m in stored)  # the premise

    torch.manual_seed(0)
    cfg = thin_crack_config(data)
    model = create_model("segdec_tiny", image_size=TRAIN_SIZE)
    test = predict_split(model, cfg, TEST)
    assert len(test.masks) == len(stored)
    for mask, seg, data_png in zip(test.masks, test.seg_probs, stored, strict=True):
        assert mask.shape == seg.shape == (THIN_SIZE, THIN_SIZE)  # the map is upsampled
        np.testing.assert_array_equal(mask, decode_mask(data_png))  # the crack survives
    cracked = np.array([m.any() for m in test.masks])
    assert cracked.any() and all(m[:, THIN_COLUMN].all() and m.sum() == THIN_SIZE
                                 for m in np.array(test.masks)[cracked])

    # Both protocols on the full-resolution pairs equal the definitions computed here. Below
    # the lowest probability every pixel is crack: on a cracked image SegDec recall 1 and
    # precision = the share of the crack's cross-dilated band (columns 0-3) in the image; a
    # crack-free image counts 0 in the means.
    threshold = (min(int(s.min()) for s in test.seg_probs) - 0.5) / 255
    _, metrics = pixel_split_metrics(test, "test", threshold, segdec_threshold=threshold)
    preds = [s.astype(np.float32) / 255 for s in test.seg_probs]
    gts = [m.astype(bool) for m in test.masks]
    expected = _reference_segdec(preds, gts, threshold)
    assert [metrics[f"test/segdec_{k}"] for k in ("precision", "recall", "f1")] == \
        pytest.approx(expected, abs=1e-9)
    assert metrics["test/segdec_recall"] == pytest.approx(cracked.mean())
    assert metrics["test/segdec_precision"] == pytest.approx(cracked.mean() * 4 / THIN_SIZE)
    assert metrics["test/pixel_f1"] == pytest.approx(
        pixel_metrics(preds, gts, threshold)["f1"], abs=1e-12)


def test_in_process_batches_decode_as_the_ray_pipeline_does(tmp_path):
    from crackray.data.batches import prepare_batch
    from crackray.inference import split_batches

    cfg = thin_crack_config(thin_crack_dataset(tmp_path))
    columns = ["image", "label", "surface", "path", "sha256", "mask", "has_mask"]
    table = read_split_table(cfg.data.path, "train", columns)
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}
    expected = prepare_batch(rows, image_size=TRAIN_SIZE, augment_strength=0.0, with_masks=True)
    [batch] = split_batches(cfg, "train", len(table), torch.device("cpu"), with_masks=True)
    np.testing.assert_array_equal(batch["mask"].numpy(), expected["mask"])
    np.testing.assert_array_equal(batch["has_mask"].numpy(), expected["has_mask"])
    np.testing.assert_array_equal(batch["label"].numpy(), expected["label"])
    assert batch["path"].tolist() == expected["path"].tolist()
    torch.testing.assert_close(batch["image"], to_model_input(expected["image"], None))
