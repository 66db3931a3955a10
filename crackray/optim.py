"""Optimizers and learning-rate schedules by name (plain torch)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from crackray.config import OptimConfig
from crackray.errors import ConfigError
from crackray.models.finetune import split_parameters

HEAD, BACKBONE = "head", "backbone"  # param group names; the Schedule finds the backbone by name


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The new head at `lr`, the backbone at `lr * backbone_lr_scale`. The head comes first, so
    `param_groups[0]["lr"]` (the learning rate the engine logs) is the configured one."""
    backbone, head = split_parameters(model)
    return [
        {"params": head, "lr": cfg.lr, "name": HEAD},
        {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_scale, "name": BACKBONE},
    ]


def build_optimizer(
    model: nn.Module | Iterable[torch.Tensor], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """An optimizer over a model's head and backbone groups, or over plain parameters (one
    group: then the backbone options cannot apply)."""
    if isinstance(model, nn.Module):
        params = param_groups(model, cfg)
    elif cfg.backbone_lr_scale != 1.0 or cfg.freeze_backbone_epochs:
        raise ValueError(
            "optim.backbone_lr_scale / freeze_backbone_epochs need the model, "
            "not its parameters: call build_optimizer(model, cfg)"
        )
    else:
        params = model
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    raise ConfigError(f"Invalid optimizer '{cfg.name}'. Only adam, adamw, sgd are supported.")


class Schedule:
    """Wraps a torch LR scheduler with when it steps: per optimizer step or per epoch.

    Cosine-with-warmup and one-cycle are per-step (smooth over few epochs); reduce-on-plateau
    steps once per epoch on the validation F1. Each param group keeps its own base learning
    rate (the backbone's is scaled); a head-only warm-up holds the backbone group at 0 for
    its first steps, which needs a per-step schedule (cosine, or none).
    """

    def __init__(self, optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int):
        frozen = cfg.freeze_backbone_epochs * steps_per_epoch
        self.per_step = cfg.scheduler in ("cosine", "onecycle") or bool(frozen)
        total = max(1, epochs * steps_per_epoch)
        # One-cycle raises past its planned steps; the step count per epoch is an estimate
        # (the driver's), so never step beyond it.
        self.max_steps, self.steps = total, 0
        warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
        if cfg.scheduler == "cosine" or (cfg.scheduler == "none" and frozen):

            def cosine(step: int) -> float:
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                progress = (step - warmup) / max(1, total - warmup)
                return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

            factor = cosine if cfg.scheduler == "cosine" else lambda step: 1.0

            def backbone_factor(step: int) -> float:
                # lr 0 rather than requires_grad=False: DDP fixes at wrap time which
                # parameters get gradients, and AdamW's decay (scaled by lr) then stops too.
                return 0.0 if step < frozen else factor(step)

            factors = [
                backbone_factor if group.get("name") == BACKBONE else factor
                for group in optimizer.param_groups
            ]
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        elif cfg.scheduler == "onecycle":
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[group["lr"] for group in optimizer.param_groups],
                total_steps=total + 1,
            )
        elif cfg.scheduler == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=0.5, patience=1
            )
        else:
            self.scheduler = None

    def step_batch(self) -> None:
        if self.scheduler is not None and self.per_step and self.steps < self.max_steps:
            self.scheduler.step()
            self.steps += 1

    def step_epoch(self, score: float) -> None:
        """End of an epoch: the plateau scheduler watches the validation objective (max)."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(0.0 if math.isnan(score) else score)

    def state_dict(self) -> dict:
        if self.scheduler is None:
            return {}
        return {"scheduler": self.scheduler.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None and state:
            self.scheduler.load_state_dict(state["scheduler"])
            self.steps = state["steps"]
