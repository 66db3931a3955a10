"""Model files: weights plus what is needed to rebuild and use them, loaded safely.

A model file is a plain dict of tensors and primitives, so `torch.load(weights_only=True)`
reads it: loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from crackray.config import RunConfig
from crackray.errors import CrackrayError
from crackray.models import create_model

STATE_FILE = "state.pt"  # latest training state, for resume
BEST_FILE = "best_model.pt"  # best-F1 weights so far


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def save_model_file(
    path: str | Path,
    weights: dict[str, torch.Tensor],
    cfg: RunConfig,
    *,
    tile: int | None = None,
    **extra: Any,
) -> Path:
    """Weights + the resolved config (model name, image size) + the scale it was trained at
    + extras such as the epoch, the validation F1 or the calibrated threshold.

    `tile` is the training data's tile size (the dataset manifest's `tile`: the px its photos
    were cut into before being resized to `image_size`); None when the dataset's images were
    used as they are. `predict` cuts photo windows at that size, so cracks keep their scale."""
    path = Path(path)
    torch.save({"model_state": weights, "config": cfg.model_dump(), **extra, "tile": tile,
                "image_size": cfg.data.image_size}, path)
    return path


def trained_tile(payload: dict[str, Any]) -> int | None:
    """The tile size a model file records (None: unknown, or the dataset's own images)."""
    tile = payload.get("tile")
    return int(tile) if tile else None


def load_model_file(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CrackrayError(f"{path}: no such model file") from None
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or unsafe pickles alike
        raise CrackrayError(f"{path}: not a readable crackray model file ({exc})") from None


def build_model_from_file(path: str | Path) -> tuple[torch.nn.Module, RunConfig, dict[str, Any]]:
    """Rebuild the network a model file was saved from; returns (model, config, file dict)."""
    payload = load_model_file(path)
    cfg = RunConfig.model_validate(payload["config"])
    model = create_model(
        cfg.model.name, pretrained=False, dropout=cfg.model.dropout, image_size=cfg.data.image_size
    )
    model.load_state_dict(payload["model_state"])
    return model.eval(), cfg, payload
