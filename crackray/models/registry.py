"""Models by name, timm-style: `@register_model("name")` on a builder, `create_model(name)`.

A builder takes `(pretrained, dropout, image_size)` and returns an `nn.Module`, so the
config, the tuner and the CLI never import a model class directly: a new architecture is
one decorated function. `pretrained` is False (random init), True (the entry's default
ImageNet weights) or a state dict in the backbone's original layout (from `model.weights`);
only entries registered with `pretrained=True` get anything but False.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from crackray.errors import ConfigError
from crackray.models.pretrained import load_exact, read_state_dict

Pretrained = bool | dict[str, torch.Tensor]
Builder = Callable[[Pretrained, float, int | None], nn.Module]


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    pretrained: bool  # has ImageNet weights (and so a layout that `model.weights` may use)
    segments: bool  # forward returns (decision logit, segmentation logit), as segdec does


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str, *, pretrained: bool = False, segments: bool = False
) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = _Entry(builder, pretrained, segments)
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ConfigError(f"Invalid model '{name}'. Supported: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_segments(name: str) -> bool:
    """Does the model also segment (learn from masks, return a crack map)?"""
    return _entry(name).segments


def create_model(
    name: str,
    pretrained: bool = False,
    dropout: float = 0.0,
    image_size: int | None = None,
    weights: str | None = None,
) -> nn.Module:
    """Build a registered model; `image_size` lets size-constrained models check the input.

    `weights` (a local file) replaces `pretrained`: either a crackray model of this name (a
    state dict or a model file, head included) or the backbone's ImageNet state dict in its
    library's layout, whose 1000-class classifier is then replaced by the crack head.
    """
    entry = _entry(name)
    if pretrained and not entry.pretrained:
        raise ConfigError(f"model.pretrained: '{name}' has no pretrained weights; set it to false")
    if weights is None:
        return entry.builder(pretrained, dropout, image_size)

    model = entry.builder(False, dropout, image_size)
    try:
        state = read_state_dict(weights)
        if entry.pretrained and set(state) != set(model.state_dict()):
            return entry.builder(state, dropout, image_size)  # the backbone's ImageNet layout
        load_exact(model, state, f"a crackray '{name}' model")
    except ConfigError as err:
        raise ConfigError(f"model.weights: {weights} {err}") from None
    return model
