"""Models by name, timm-style: `@register_model("name")` on a builder, `create_model(name)`.

A builder takes `(pretrained, dropout, image_size)` and returns an `nn.Module`, so the
config, the tuner and the CLI never import a model class directly: a new architecture is
one decorated function.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from crackray.errors import ConfigError

Builder = Callable[[bool, float, int | None], nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(
    name: str, pretrained: bool = False, dropout: float = 0.0, image_size: int | None = None
) -> nn.Module:
    """Build a registered model; `image_size` lets size-constrained models check the input."""
    if name not in _REGISTRY:
        raise ConfigError(f"Invalid model '{name}'. Supported: {', '.join(list_models())}")
    return _REGISTRY[name](pretrained, dropout, image_size)


def no_pretrained_weights(name: str, pretrained: bool) -> None:
    """Refuse `pretrained=True` for our own models instead of silently training from scratch."""
    if pretrained:
        raise ConfigError(f"model.pretrained: '{name}' has no pretrained weights; set it to false")
