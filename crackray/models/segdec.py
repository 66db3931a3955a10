"""SegDecNet: a segmentation subnet plus a decision subnet on top of it.

After Božič, Tabernik and Skočaj, "Mixed supervision for surface-defect detection: from weakly
to fully supervised learning" (Computers in Industry, 2021). The segmentation subnet learns
from pixel masks where a tile has one; the decision subnet gives the per-tile crack logit and
learns from image labels alone, so weakly labelled positives still train it.

The paper's widths are `base_channels=32, feature_channels=1024, feature_kernel=15`; the
defaults here are smaller so that the model trains on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from crackray.errors import ConfigError
from crackray.models.classifiers import conv_bn_relu, logit_head
from crackray.models.registry import Pretrained, register_model

DOWNSAMPLE = 8  # three 2x2 max-pools in the segmentation subnet


class SegDecNet(nn.Module):
    """forward(x) -> (decision logit (B,), segmentation logit (B, 1, H/8, W/8)).

    Set `gradient_adjustment = True` to stop the decision loss's gradients at the
    segmentation subnet (the paper's gradient-flow adjustment): the decision subnet then reads
    detached features, so a decision head that is still noisy early in training cannot
    disturb the segmentation features it depends on.
    """

    def __init__(
        self,
        base_channels: int = 16,
        feature_channels: int = 128,
        kernel_size: int = 5,
        feature_kernel: int = 7,
        dropout: float = 0.0,
    ):
        super().__init__()
        c, k = base_channels, kernel_size
        self.segmentation = nn.Sequential(
            conv_bn_relu(3, c, k),
            nn.MaxPool2d(2),
            *[conv_bn_relu(c if i == 0 else 2 * c, 2 * c, k) for i in range(3)],
            nn.MaxPool2d(2),
            *[conv_bn_relu(2 * c, 2 * c, k) for _ in range(4)],
            nn.MaxPool2d(2),
            conv_bn_relu(2 * c, feature_channels, feature_kernel),
        )
        self.seg_head = nn.Conv2d(feature_channels, 1, 1)
        # ceil_mode keeps at least one cell when the 1/8 map is already tiny (64 px input).
        self.decision = nn.Sequential(
            nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(feature_channels + 1, 8, k),
            nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(8, 16, k),
            nn.MaxPool2d(2, ceil_mode=True),
            conv_bn_relu(16, 32, k),
        )
        # Global average + max of the decision features (2 x 32) and of the seg map (2 x 1).
        self.head = logit_head(2 * 32 + 2, dropout)
        self.gradient_adjustment = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-2] % DOWNSAMPLE or x.shape[-1] % DOWNSAMPLE:
            raise ValueError(f"segdec needs H, W divisible by {DOWNSAMPLE}; got {tuple(x.shape)}")
        features = self.segmentation(x)
        seg = self.seg_head(features)
        if self.gradient_adjustment:
            features, seg_in = features.detach(), seg.detach()
        else:
            seg_in = seg
        d = self.decision(torch.cat([features, seg_in], dim=1))
        pooled = [d.mean(dim=(2, 3)), d.amax(dim=(2, 3))]
        pooled += [seg_in.mean(dim=(2, 3)), seg_in.amax(dim=(2, 3))]
        return self.head(torch.cat(pooled, dim=1)), seg


def _check_size(name: str, image_size: int | None) -> None:
    if image_size is not None and image_size % DOWNSAMPLE:
        raise ConfigError(
            f"data.image_size: {name} needs a multiple of {DOWNSAMPLE}, got {image_size}"
        )


@register_model("segdec", segments=True)
def segdec(pretrained: Pretrained, dropout: float, image_size: int | None) -> nn.Module:
    _check_size("segdec", image_size)
    return SegDecNet(dropout=dropout)


@register_model("segdec_tiny", segments=True)
def segdec_tiny(pretrained: Pretrained, dropout: float, image_size: int | None) -> nn.Module:
    _check_size("segdec_tiny", image_size)
    return SegDecNet(
        base_channels=4, feature_channels=8, kernel_size=3, feature_kernel=3, dropout=dropout
    )
