"""Image classifiers that output one crack logit per image, shape (B,).

Every head ends in `nn.Flatten(0)`, which turns (B, 1) into (B,) inside the model, so the
losses, metrics and the exported model all see the same shape without a wrapper module.
"""

from __future__ import annotations

import torch
from torch import nn

from crackray.data.transforms import MEAN, STD
from crackray.models import pretrained as weights
from crackray.models.registry import Pretrained, register_model


class LogitHead(nn.Sequential):
    """The crack head that replaces a backbone's ImageNet classifier. Its own type marks which
    parameters are new (the head) and which come with the backbone, for fine-tuning options
    such as a lower backbone learning rate (`finetune.split_parameters`)."""


def logit_head(in_features: int, dropout: float) -> LogitHead:
    return LogitHead(nn.Dropout(dropout), nn.Linear(in_features, 1), nn.Flatten(0))


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
        self.head = LogitHead(nn.Linear(4, 1), nn.Flatten(0))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class TimmClassifier(nn.Module):
    """A timm network without its classifier (pooled features), then the crack head.

    crackray feeds every model ImageNet-normalised input (`data.transforms`); a timm network
    may expect other statistics (TF ports: mean = std = 0.5, i.e. pixels in [-1, 1]). A fixed
    per-channel affine map converts between the two, so the pretrained stem sees the inputs
    it was trained on. Its constants are non-persistent buffers: the state dict holds only
    learned weights.
    """

    def __init__(self, net: nn.Module, dropout: float):
        super().__init__()
        net.reset_classifier(0)
        self.backbone = net
        self.head = logit_head(net.num_features, dropout)
        mean = torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1)
        ours_mean = torch.from_numpy(MEAN / 255.0).view(1, 3, 1, 1)
        ours_std = torch.from_numpy(STD / 255.0).view(1, 3, 1, 1)
        # pixel = x * ours_std + ours_mean; the network wants (pixel - mean) / std.
        self.register_buffer("input_scale", ours_std / std, persistent=False)
        self.register_buffer("input_shift", (ours_mean - mean) / std, persistent=False)

    def forward(self, x):
        return self.head(self.backbone(x * self.input_scale + self.input_shift))


@register_model("simple_cnn")
def simple_cnn(pretrained: Pretrained, dropout: float, image_size: int | None) -> nn.Module:
    return SimpleCNN(dropout=dropout)


@register_model("test_tiny")
def test_tiny(pretrained: Pretrained, dropout: float, image_size: int | None) -> nn.Module:
    return TinyNet()


@register_model("efficientnet_lite0", pretrained=True)
def efficientnet_lite0(pretrained: Pretrained, dropout: float, image_size: int | None) -> nn.Module:
    """EfficientNet-Lite0 (4.7 M parameters; ReLU6, no squeeze-excite): the pretrained
    backbone that works offline, its ImageNet weights installed with crackray."""
    return TimmClassifier(weights.lite0_imagenet(pretrained), dropout)


def _register_torchvision(arch: str, replace_head) -> None:
    """Register `arch` with its ImageNet head swapped for a one-logit head by `replace_head`."""

    @register_model(arch, pretrained=True)
    def build(pretrained: Pretrained, dropout: float, image_size: int | None) -> nn.Module:
        model = weights.torchvision_imagenet(arch, pretrained)
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
