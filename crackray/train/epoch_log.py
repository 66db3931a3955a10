"""Rank 0's view of the MLflow run of a training run or trial: per-epoch metrics, and the
confusion matrix, best checkpoint and mask overlays when they change."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from crackray import checkpoints
from crackray.config import RunConfig
from crackray.data.pipeline import overlay_examples
from crackray.data.splits import VAL
from crackray.engine import EvalOutputs
from crackray.evaluation import decision_artifacts, mask_overlay_figure
from crackray.tracking import Tracker

# How long rank 0 waits at the end for an absent tracking server to take its buffered writes.
FLUSH_PATIENCE_S = 300.0


class EpochLogger:
    def __init__(self, tracking: dict, cfg: RunConfig, segments: bool, history: list[dict]):
        self.run_id = tracking["run_id"]
        self.cfg = cfg
        # segdec: fixed validation images whose predicted masks are drawn every few epochs
        self.examples = overlay_examples(cfg, VAL) if segments else None
        # Importing MLflow and opening its store take seconds: the first epoch trains
        # meanwhile, instead of every other rank waiting for rank 0 at DDP's first collective.
        # A store that cannot be opened raises at the first use of `tracker`.
        self._connecting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-connect")
        self._tracker = self._connecting.submit(self._connect, tracking["uri"], history)

    @classmethod
    def on_rank_zero(cls, rank: int, tracking: dict | None, cfg: RunConfig, segments: bool,
                     history: list[dict]) -> EpochLogger | None:
        """The logger of rank 0 (None elsewhere: one trial is one MLflow run), caught up
        with `history` once connected."""
        if rank != 0 or not tracking:
            return None
        return cls(tracking, cfg, segments, list(history))

    @property
    def tracker(self) -> Tracker:
        return self._tracker.result()

    def _connect(self, uri: str, history: list[dict]) -> Tracker:
        tracker = Tracker(uri)
        self.catch_up(tracker, history)
        return tracker

    def catch_up(self, tracker: Tracker, history: list[dict]) -> None:
        """Log epochs that a restored checkpoint knows but MLflow does not (a crash between
        checkpoint and logging); epochs MLflow already has are never logged twice."""
        logged = tracker.logged_steps(self.run_id, "val/f1")
        for row in history:
            if row["epoch"] not in logged:
                tracker.log_metrics(self.run_id, _numeric(row), step=row["epoch"])

    def log_epoch(self, epoch: int, metrics: dict, val: EvalOutputs, improved: bool,
                  best_file: Path | None, model: torch.nn.Module, device) -> None:
        self.tracker.log_metrics(self.run_id, _numeric(metrics), step=epoch)
        if improved:
            self.tracker.log_artifacts(self.run_id, decision_artifacts(val, 0.5, "val"))
            self.tracker.log_artifact(self.run_id, best_file, "checkpoints")
            self.tracker.log_best_model(self.run_id, best_file, step=epoch,
                                        tags={"val/objective": metrics.get("val/objective")})
            self.tracker.set_tags(self.run_id, {"crackray.best_epoch": epoch})
        last = metrics["early_stopped"] or epoch == self.cfg.train.epochs - 1
        if self.examples is not None and ((epoch + 1) % self.cfg.train.log_masks_every == 0
                                          or last):
            fig = mask_overlay_figure(checkpoints.unwrap(model), self.examples,
                                      metrics["val/pixel_threshold"],
                                      f"val-epoch-{epoch:04d}", device)
            self.tracker.log_artifacts(self.run_id, {f"masks/val-epoch-{epoch:04d}.png": fig})

    def close(self) -> None:
        self._connecting.shutdown()
        if not self.tracker.flush(timeout_s=FLUSH_PATIENCE_S):
            warnings.warn(
                f"MLflow unreachable for {FLUSH_PATIENCE_S:.0f} s after training: "
                "the last tracking writes of this run are lost",
                stacklevel=1,
            )


def _numeric(row: dict) -> dict:
    return {
        k: v
        for k, v in row.items()
        if isinstance(v, int | float) and k not in ("epoch", "epochs_planned")
    }
