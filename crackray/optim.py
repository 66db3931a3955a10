"""Optimizers and learning-rate schedules by name (plain torch)."""

from __future__ import annotations

import math

import torch

from crackray.config import OptimConfig
from crackray.errors import ConfigError


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
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
    steps once per epoch on the validation F1.
    """

    def __init__(self, optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int):
        self.per_step = cfg.scheduler in ("cosine", "onecycle")
        total = max(1, epochs * steps_per_epoch)
        # One-cycle raises past its planned steps; the step count per epoch is an estimate
        # (the driver's), so never step beyond it.
        self.max_steps, self.steps = total, 0
        warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
        if cfg.scheduler == "cosine":

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                progress = (step - warmup) / max(1, total - warmup)
                return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        elif cfg.scheduler == "onecycle":
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=cfg.lr, total_steps=total + 1
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

    def step_epoch(self, val_f1: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(0.0 if math.isnan(val_f1) else val_f1)

    def state_dict(self) -> dict:
        if self.scheduler is None:
            return {}
        return {"scheduler": self.scheduler.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None and state:
            self.scheduler.load_state_dict(state["scheduler"])
            self.steps = state["steps"]
