"""Image classifiers that output one crack logit per image, shape (B,).

Every head ends in `nn.Flatten(0)`, which turns (B, 1) into (B,) inside the model, so the
losses, metrics and the exported model all see the same shape without a wrapper module.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from crackray.models.registry import no_pretrained_weights, register_model


def logit_head(in_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, 1), nn.Flatten(0))


def conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 3) -> nn.Sequential:
    # "Same" padding keeps the size; no conv bias, as BatchNorm's shift makes it redundant.
    conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SimpleCNN(nn.Module):
    """Conv blocks with a 2x max-pool between them, then global average + max pooling.

    Max pooling keeps a strong response from a thin crack covering a few pixels, which the
    average alone would dilute over the tile; the pair is concatenated for the head.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), dropout: float = 0.0):
        super().__init__()
        blocks, c_in = [], 3
        for i, c_out in enumerate(widths):
            if i:
                blocks.append(nn.MaxPool2d(2))
            blocks.append(conv_bn_relu(c_in, c_out))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.head = logit_head(2 * c_in, dropout)

    def forward(self, x):
        f = self.features(x)
        pooled = [f.mean(dim=(2, 3)), f.amax(dim=(2, 3))]
        return self.head(torch.cat(pooled, dim=1))


class TinyNet(nn.Module):
    """The smallest real classifier (about 100 parameters): for fast tests of the plumbing."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


@register_model("simple_cnn")
def simple_cnn(pretrained: bool, dropout: float, image_size: int | None) -> nn.Module:
    no_pretrained_weights("simple_cnn", pretrained)
    return SimpleCNN(dropout=dropout)


@register_model("test_tiny")
def test_tiny(pretrained: bool, dropout: float, image_size: int | None) -> nn.Module:
    no_pretrained_weights("test_tiny", pretrained)
    return TinyNet()


def _torchvision_backbone(arch: str, pretrained: bool) -> nn.Module:
    # Looked up at call time (not imported by name) so tests can stand in for the builder and
    # check the weights requested without downloading them.
    weights = torchvision.models.get_model_weights(arch).DEFAULT if pretrained else None
    return getattr(torchvision.models, arch)(weights=weights)


def _register_torchvision(arch: str, replace_head) -> None:
    """Register `arch` with its ImageNet head swapped for a one-logit head by `replace_head`."""

    @register_model(arch)
    def build(pretrained: bool, dropout: float, image_size: int | None) -> nn.Module:
        model = _torchvision_backbone(arch, pretrained)
        replace_head(model, dropout)
        return model


def _resnet_head(model, dropout):
    model.fc = logit_head(model.fc.in_features, dropout)


def _efficientnet_head(model, dropout):
    # torchvision's head is Dropout(0.2) + Linear: the configured dropout replaces it.
    model.classifier = logit_head(model.classifier[-1].in_features, dropout)


def _keep_first_two_head(model, dropout):
    # MobileNetV3: Linear-Hardswish-Dropout-Linear (keep the hidden layer, replace the
    # dropout + output); ConvNeXt: LayerNorm2d-Flatten-Linear (keep the norm).
    head = logit_head(model.classifier[-1].in_features, dropout)
    model.classifier = nn.Sequential(*model.classifier[:2], head)


for _arch in ("resnet18", "resnet34", "resnet50"):
    _register_torchvision(_arch, _resnet_head)
_register_torchvision("efficientnet_b0", _efficientnet_head)
for _arch in ("mobilenet_v3_small", "mobilenet_v3_large", "convnext_tiny"):
    _register_torchvision(_arch, _keep_first_two_head)
