"""Losses against hand computations."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from crackray.config import LossConfig, RunConfig
from crackray.losses import (
    SegDecLoss,
    build_classification_loss,
    distance_weighted_mask,
    dynamic_balance_weights,
    resolve_pos_weight,
    seg_loss_weights,
)
from crackray.models.segdec import SegDecNet

LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0])
TARGETS = torch.tensor([1.0, 1.0, 0.0, 0.0])


def _manual_bce(logits, targets, pos_weight):
    sig = [1 / (1 + math.exp(-x)) for x in logits.tolist()]
    terms = [
        -(pos_weight * t * math.log(s) + (1 - t) * math.log(1 - s))
        for s, t in zip(sig, targets.tolist(), strict=True)
    ]
    return terms


def test_bce_with_pos_weight_matches_formula():
    loss = build_classification_loss(LossConfig(name="bce"), pos_weight=3.0)
    expected = _manual_bce(LOGITS, TARGETS, 3.0)
    assert loss(LOGITS, TARGETS).item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    per_sample = build_classification_loss(LossConfig(), 3.0, reduction="none")(LOGITS, TARGETS)
    assert per_sample.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("pos_weight", [1.0, 4.0])
def test_focal_gamma0_alpha_half_is_half_bce(pos_weight):
    cfg = LossConfig(name="focal", focal_alpha=0.5, focal_gamma=0.0)
    focal = build_classification_loss(cfg, pos_weight, reduction="none")(LOGITS, TARGETS)
    bce = build_classification_loss(LossConfig(), pos_weight, reduction="none")(LOGITS, TARGETS)
    torch.testing.assert_close(focal, 0.5 * bce)


def test_focal_matches_formula_and_down_weights_easy_samples():
    cfg = LossConfig(name="focal", focal_alpha=0.25, focal_gamma=2.0)
    loss = build_classification_loss(cfg, pos_weight=2.0, reduction="none")(LOGITS, TARGETS)
    ce = _manual_bce(LOGITS, TARGETS, 1.0)
    expected = []
    for x, t, c in zip(LOGITS.tolist(), TARGETS.tolist(), ce, strict=True):
        p_true = 1 / (1 + math.exp(-x)) if t else 1 - 1 / (1 + math.exp(-x))
        weight = 2.0 * 0.25 if t else 0.75
        expected.append(weight * (1 - p_true) ** 2 * c)
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)
    assert (loss < torch.tensor(ce)).all()


def test_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        build_classification_loss(LossConfig(), 1.0, reduction="sum")


def test_resolve_pos_weight_modes():
    def cfg(**loss):
        return RunConfig.model_validate({"loss": loss})

    assert resolve_pos_weight(cfg(class_weighting="none"), 10, 90) == 1.0
    assert resolve_pos_weight(cfg(class_weighting="inverse_frequency"), 10, 90) == 9.0
    assert resolve_pos_weight(cfg(class_weighting="inverse_frequency"), 0, 5) == 1.0
    assert resolve_pos_weight(cfg(class_weighting="explicit", pos_weight=2.5), 10, 90) == 2.5


def test_dynamic_balance_weights():
    assert dynamic_balance_weights(0, 5, enabled=True) == (1.0, 0.0)
    assert dynamic_balance_weights(2, 5, enabled=True) == (0.5, 0.5)
    assert dynamic_balance_weights(4, 5, enabled=True) == (0.0, 1.0)
    assert dynamic_balance_weights(0, 1, enabled=True) == (0.5, 0.5)
    assert dynamic_balance_weights(0, 5, enabled=False) == (1.0, 1.0)
    assert dynamic_balance_weights(4, 5, enabled=False) == (1.0, 1.0)
    with pytest.raises(ValueError):
        dynamic_balance_weights(5, 5, enabled=True)


def test_distance_weights_peak_at_crack_centre():
    mask = torch.zeros(9, 12)
    mask[2:7, 1:4] = 1  # 5x3 region: its centre column is 2 px from the background
    mask[4, 7:11] = 1  # 1 px line: every pixel is its own centre
    w = distance_weighted_mask(mask, p=2.0, max_value=3.0)
    assert w.shape == mask.shape
    assert (w[mask == 0] == 1).all()
    assert w[4, 2].item() == pytest.approx(3.0)  # centre of the wide region
    assert w[2, 2].item() == pytest.approx(1 + 2 * (1 / 2) ** 2)  # edge: d=1 of d_max=2
    assert torch.allclose(w[4, 7:11], torch.tensor(3.0))
    assert ((w[mask == 1] >= 1) & (w[mask == 1] <= 3)).all()
    assert (distance_weighted_mask(torch.zeros(4, 4), 2.0, 3.0) == 1).all()


def _segdec_batch():
    torch.manual_seed(0)
    seg_logit = torch.randn(3, 1, 4, 4, requires_grad=True)
    dec_logit = torch.randn(3, requires_grad=True)
    label = torch.tensor([1, 1, 0])
    mask = torch.zeros(3, 32, 32)
    mask[0, 10, 3:20] = 1  # a 1 px crack: max-pooling keeps it in the 4x4 map
    has_mask = torch.tensor([True, False, True])  # sample 1: weakly labelled positive
    return dec_logit, seg_logit, label, mask, has_mask


def test_segdec_loss_combines_parts():
    dec_logit, seg_logit, label, mask, has_mask = _segdec_batch()
    cfg = LossConfig(delta_cls=0.7, dynamic_balance=True)
    total, parts = SegDecLoss(cfg)(dec_logit, seg_logit, label, mask, has_mask, 1, 3)
    assert (parts["seg_weight"], parts["dec_weight"]) == (0.5, 0.5)
    target = torch.nn.functional.max_pool2d(mask.unsqueeze(1), 8)
    assert target[0, 0, 1].tolist() == [1, 1, 1, 0]
    seg = torch.nn.functional.binary_cross_entropy_with_logits(seg_logit[[0, 2]], target[[0, 2]])
    dec = torch.nn.functional.binary_cross_entropy_with_logits(dec_logit, label.float())
    torch.testing.assert_close(parts["seg"], seg.detach())
    torch.testing.assert_close(parts["dec"], dec.detach())
    torch.testing.assert_close(total, 0.5 * seg + 0.7 * 0.5 * dec)


def test_sample_without_mask_adds_nothing_to_seg_loss():
    dec_logit, seg_logit, label, mask, has_mask = _segdec_batch()
    loss = SegDecLoss(LossConfig())
    seg = loss.segmentation_loss(seg_logit, mask, has_mask)
    changed_mask, changed_logit = mask.clone(), seg_logit.detach().clone()
    changed_mask[1] = 1
    changed_logit[1] = 50.0
    torch.testing.assert_close(loss.segmentation_loss(changed_logit, changed_mask, has_mask), seg)
    seg.backward()
    assert not seg_logit.grad[1].any()
    assert seg_logit.grad[0].any()


def test_no_masked_sample_gives_connected_zero():
    _, seg_logit, _, mask, _ = _segdec_batch()
    seg = SegDecLoss(LossConfig()).segmentation_loss(seg_logit, mask, torch.zeros(3, dtype=bool))
    assert seg.item() == 0.0
    seg.backward()
    assert seg_logit.grad is not None


def test_weighted_seg_loss_weighs_crack_pixels_up():
    dec_logit, seg_logit, label, mask, has_mask = _segdec_batch()
    plain = SegDecLoss(LossConfig()).segmentation_loss(seg_logit, mask, has_mask)
    cfg = LossConfig(weighted_seg=True, weighted_seg_max=3.0)
    weighted = SegDecLoss(cfg).segmentation_loss(seg_logit, mask, has_mask)
    assert weighted > plain


def _wide_crack_masks() -> torch.Tensor:
    """(2, 1, 32, 32): a 7 px wide band and a 3 px wide diagonal. Pooled to 4 x 4, each is
    1-2 cells wide; at full resolution their pixels lie at several distances from the edge."""
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, 0, 5:12, 2:30] = 1
    for i in range(4, 28):
        masks[1, 0, i, i - 2 : i + 1] = 1
    return masks


def _direct_weights(mask: np.ndarray, p: float, max_value: float, cell: int) -> np.ndarray:
    """The definition: 1 + (max - 1) * (d / d_max)^p on crack pixels (d: distance to the
    background at full resolution, d_max: the largest in the pixel's 8-connected region),
    1 elsewhere; then the mean over each cell x cell block."""
    positive = mask > 0
    d = ndimage.distance_transform_edt(positive)
    regions, _ = ndimage.label(positive, structure=np.ones((3, 3)))
    full = np.ones(mask.shape)
    for region in range(1, regions.max() + 1):
        inside = regions == region
        full[inside] = 1 + (max_value - 1) * (d[inside] / d[inside].max()) ** p
    h, w = mask.shape
    return full.reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3))


@pytest.mark.parametrize("p", [0.5, 1.0, 4.0])
def test_seg_loss_weights_follow_the_definition_at_full_resolution(p):
    masks = _wide_crack_masks()
    weights = seg_loss_weights(masks, (4, 4), p=p, max_value=3.0)
    assert weights.shape == (2, 1, 4, 4)
    for got, mask in zip(weights, masks, strict=True):
        expected = _direct_weights(mask[0].numpy(), p, 3.0, cell=8)
        np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-6)


def test_weighted_seg_p_changes_the_weights_and_the_loss():
    masks = _wide_crack_masks()
    low, high = (seg_loss_weights(masks, (4, 4), p, 3.0) for p in (1.0, 4.0))
    crack_cells = torch.nn.functional.adaptive_max_pool2d(masks, (4, 4)) > 0
    # A larger p pulls every off-centre pixel's weight towards 1.
    assert (high[crack_cells] < low[crack_cells]).all()
    assert (high[~crack_cells] == 1).all() and (low[~crack_cells] == 1).all()
    torch.manual_seed(0)
    seg_logit, has_mask = torch.randn(2, 1, 4, 4), torch.ones(2, dtype=bool)
    losses = [
        SegDecLoss(LossConfig(weighted_seg=True, weighted_seg_p=p)).segmentation_loss(
            seg_logit, masks, has_mask
        )
        for p in (1.0, 4.0)
    ]
    assert losses[0] != losses[1]


@pytest.mark.parametrize("adjust", [True, False])
def test_decision_loss_and_gradient_adjustment(adjust):
    """At the last dynamically balanced epoch only the decision loss counts: with gradient
    adjustment it must leave the segmentation subnet untouched."""
    torch.manual_seed(0)
    model = SegDecNet(base_channels=4, feature_channels=8, kernel_size=3, feature_kernel=3)
    model.gradient_adjustment = adjust
    dec_logit, seg_logit = model(torch.randn(2, 3, 32, 32))
    mask = torch.zeros(2, 32, 32)
    mask[0, 5:9, 5:20] = 1
    loss = SegDecLoss(LossConfig(dynamic_balance=True))
    total, _ = loss(
        dec_logit, seg_logit, torch.tensor([1, 0]), mask, torch.ones(2, dtype=bool), 4, 5
    )
    total.backward()
    grads = [p.grad for p in [*model.segmentation.parameters(), *model.seg_head.parameters()]]
    if adjust:
        assert all(g is None or not g.any() for g in grads)
    else:
        assert sum(g.abs().sum() for g in grads) > 0
    assert any(p.grad.any() for p in model.decision.parameters())
