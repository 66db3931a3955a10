"""Losses: class-weighted BCE / focal for classifiers, and SegDecNet's seg + decision loss.

Logits in, never probabilities: `binary_cross_entropy_with_logits` is the numerically stable
form. Crack is the positive class; `pos_weight` multiplies the loss of crack samples.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from crackray.config import LossConfig, RunConfig
from crackray.data.composition import epoch_composition

# 8-connectivity: a diagonal crack is one region, not a chain of single pixels.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def resolve_pos_weight(cfg: RunConfig, n_pos: int, n_neg: int) -> float:
    """The crack-class weight for `cfg.loss.class_weighting`, given the training split's crack
    (`n_pos`) and crack-free (`n_neg`) counts.

    inverse_frequency weighs by the imbalance left in the epoch the workers train on, after
    balanced sampling's repeats, frequency sampling's draws and `use_negatives: false`: the
    split's own ratio on top of a balanced epoch would correct it twice. An epoch of one class
    has nothing to balance: 1.0 (0 would silence the crack loss)."""
    if cfg.loss.class_weighting == "none":
        return 1.0
    if cfg.loss.class_weighting == "explicit":
        return float(cfg.loss.pos_weight)
    epoch = epoch_composition(cfg, n_pos, n_neg)
    if epoch.positives == 0 or epoch.negatives == 0:
        return 1.0
    return epoch.negatives / epoch.positives


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss.mean() if reduction == "mean" else loss


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al., 2017) with crack-class weighting.

    `alpha` weighs cracks and `1 - alpha` non-cracks; `pos_weight` multiplies the crack term
    on top, so class weighting still applies when focal replaces BCE. gamma = 0 and alpha = 0.5
    give half the (pos-weighted) BCE.
    """

    def __init__(self, alpha: float, gamma: float, pos_weight: float, reduction: str = "mean"):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction
        # A buffer so that `.to(device)` moves it with the module.
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p = torch.sigmoid(logits)
        p_true = p * targets + (1 - p) * (1 - targets)  # probability given to the true class
        alpha = self.alpha * targets + (1 - self.alpha) * (1 - targets)
        class_weight = 1 + (self.pos_weight - 1) * targets
        loss = class_weight * alpha * (1 - p_true) ** self.gamma * ce
        return _reduce(loss, self.reduction)


def build_classification_loss(
    loss_cfg: LossConfig, pos_weight: float, reduction: str = "mean"
) -> nn.Module:
    """A module mapping (logits (B,), float targets (B,)) to the loss.

    reduction="none" gives per-sample losses: evaluation sums them across workers and divides
    by the true sample count, which a mean per worker batch cannot do.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if loss_cfg.name == "focal":
        return FocalLoss(loss_cfg.focal_alpha, loss_cfg.focal_gamma, pos_weight, reduction)
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight)), reduction=reduction)


def dynamic_balance_weights(epoch: int, epochs: int, enabled: bool) -> tuple[float, float]:
    """(seg_weight, dec_weight) for a 0-based `epoch` of `epochs`.

    SegDecNet's dynamic balancing: learn segmentation first and hand over to the decision
    subnet once its input features are meaningful; seg goes linearly from 1 at the first
    epoch to 0 at the last, and dec = 1 - seg.
    """
    if not enabled:
        return 1.0, 1.0
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} is outside 0..{epochs - 1}")
    # One epoch has no ramp: the midpoint trains both heads instead of only one.
    seg = 0.5 if epochs == 1 else 1.0 - epoch / (epochs - 1)
    return seg, 1.0 - seg


def distance_weighted_mask(mask: torch.Tensor, p: float, max_value: float) -> torch.Tensor:
    """Per-pixel seg-loss weights from a 0/1 mask (H, W): 1 off-crack, 1..max_value on it.

    As in the SegDecNet paper, a crack pixel's weight grows with its distance to the crack's
    edge, normalised by the largest such distance within its connected region (so thin and
    wide cracks both reach the maximum at their centre line): 1 + (max_value - 1) * (d/d_max)^p.
    Annotated edges are the least certain pixels, so they count the least.
    """
    positive = mask.detach().cpu().numpy() > 0
    weights = np.ones(positive.shape, dtype=np.float32)
    if positive.any():
        distance = ndimage.distance_transform_edt(positive)
        regions, n = ndimage.label(positive, structure=_EIGHT_CONNECTED)
        region_max = np.asarray(ndimage.maximum(distance, regions, index=np.arange(1, n + 1)))
        relative = distance[positive] / region_max[regions[positive] - 1]
        weights[positive] = 1.0 + (max_value - 1.0) * relative**p
    return torch.from_numpy(weights).to(mask.device)


def seg_loss_weights(mask: torch.Tensor, size, p: float, max_value: float) -> torch.Tensor:
    """Seg-loss weights (B, 1, *size) for full-resolution masks (B, 1, H, W).

    The distance weights are computed at full resolution, then averaged over each output cell
    (the cells the target is max-pooled over): a cell weighs what its pixels weigh on average,
    so cells on a crack's centre outweigh cells it only grazes, by how much set by `p`. On the
    pooled target itself every crack is 1-2 cells wide, each cell its own centre line, so all
    would weigh `max_value` whatever `p` is.
    """
    full = torch.stack([distance_weighted_mask(m[0], p, max_value) for m in mask]).unsqueeze(1)
    return F.adaptive_avg_pool2d(full, size)


class SegDecLoss(nn.Module):
    """total = seg_weight * seg_loss + delta_cls * dec_weight * dec_loss.

    Mixed supervision: only samples with `has_mask` True enter the per-pixel seg loss
    (negatives always have a full zero mask); weakly labelled positives train the decision
    subnet alone. The decision loss is the configured classification loss (BCE by default).
    """

    def __init__(self, loss_cfg: LossConfig, pos_weight: float = 1.0):
        super().__init__()
        self.cfg = loss_cfg
        self.decision_loss = build_classification_loss(loss_cfg, pos_weight)

    def forward(
        self,
        dec_logit: torch.Tensor,
        seg_logit: torch.Tensor,
        label: torch.Tensor,
        mask: torch.Tensor,
        has_mask: torch.Tensor,
        epoch: int,
        epochs: int,
    ) -> tuple[torch.Tensor, dict]:
        """Returns the total and parts: detached `seg`, `dec` tensors, float weights."""
        seg_w, dec_w = dynamic_balance_weights(epoch, epochs, self.cfg.dynamic_balance)
        seg = self.segmentation_loss(seg_logit, mask, has_mask)
        dec = self.decision_loss(dec_logit, label.float())
        total = seg_w * seg + self.cfg.delta_cls * dec_w * dec
        parts = {"seg": seg.detach(), "dec": dec.detach(), "seg_weight": seg_w, "dec_weight": dec_w}
        return total, parts

    def segmentation_loss(
        self, seg_logit: torch.Tensor, mask: torch.Tensor, has_mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean per-pixel BCE over the samples that have a mask.

        The full-size mask (B, H, W) or (B, 1, H, W) is max-pooled to the seg map's size, so a
        one-pixel crack still marks its cell positive instead of averaging away. With
        `weighted_seg`, each cell's loss is weighed by `seg_loss_weights`.
        """
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        target = F.adaptive_max_pool2d(mask.float(), seg_logit.shape[-2:])
        selected = has_mask.bool()
        if not selected.any():
            # Zero that stays connected to the graph: DDP expects every parameter to get a
            # gradient each step, even in a batch with no masked sample.
            return seg_logit.sum() * 0.0
        logits, target = seg_logit[selected], target[selected]
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.cfg.weighted_seg:
            p, max_value = self.cfg.weighted_seg_p, self.cfg.weighted_seg_max
            loss = loss * seg_loss_weights(mask[selected], logits.shape[-2:], p, max_value)
        return loss.mean()
