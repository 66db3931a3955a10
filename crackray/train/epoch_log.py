"""Rank 0's view of the MLflow run of a training run or trial: per-epoch metrics, and the
confusion matrix, best checkpoint and mask overlays when they change."""

from __future__ import annotations

import copy
import tempfile
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
from crackray.train.hooks import Hook, run_hooks
from crackray.train.state import Checkpointer, TrainingState

# How long rank 0 waits at the end for an absent tracking server to take its buffered writes.
FLUSH_PATIENCE_S = 300.0
BEST_EPOCH_TAG = "crackray.best_epoch"  # the last of an improving epoch's writes


class EpochLogger:
    def __init__(self, tracking: dict, cfg: RunConfig, segments: bool,
                 hooks: tuple[Hook, ...] = ()):
        self.run_id = tracking["run_id"]
        self.cfg, self.hooks = cfg, hooks
        # segdec: fixed validation images whose predicted masks are drawn every few epochs
        self.examples = overlay_examples(cfg, VAL) if segments else None
        # Importing MLflow and opening its store take seconds: the first epoch trains
        # meanwhile, instead of every other rank waiting for rank 0 at DDP's first collective.
        # A store that cannot be opened raises at the first use of `tracker`.
        self._connecting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-connect")
        self._tracker = self._connecting.submit(Tracker, tracking["uri"])
        self._caught_up = self._tracker  # then `catch_up`'s writes, on the same thread

    @classmethod
    def on_rank_zero(cls, rank: int, tracking: dict | None, cfg: RunConfig, segments: bool,
                     hooks: tuple[Hook, ...] = ()) -> EpochLogger | None:
        """The logger of rank 0 (None elsewhere: one trial is one MLflow run)."""
        if rank != 0 or not tracking:
            return None
        return cls(tracking, cfg, segments, hooks)

    @property
    def tracker(self) -> Tracker:
        """The open store, once `catch_up` is done with it."""
        self._caught_up.result()
        return self._tracker.result()

    def catch_up(self, state: TrainingState, best_weights: dict | None,
                 checkpointer: Checkpointer) -> None:
        """After a restore, once connected: log the epochs the checkpoint knows but MLflow
        does not (a crash between checkpoint and logging), and, if MLflow's best epoch is not
        the checkpoint's, that epoch's best model file, checkpoint artifact and confusion
        matrix. Epochs MLflow already has are never logged twice."""
        restored = copy.deepcopy(state)  # the loop goes on changing `state` meanwhile
        self._caught_up = self._connecting.submit(self._catch_up, restored, best_weights,
                                                  checkpointer)

    def _catch_up(self, restored: TrainingState, best_weights: dict | None,
                  checkpointer: Checkpointer) -> None:
        tracker = self._tracker.result()
        logged = tracker.logged_steps(self.run_id, "val/f1")
        for row in restored.history:
            if row["epoch"] not in logged:
                tracker.log_metrics(self.run_id, _numeric(row), step=row["epoch"])
        best_epoch = restored.best_epoch
        if best_epoch < 0 or tracker.run_tags(self.run_id).get(BEST_EPOCH_TAG) == str(best_epoch):
            return  # nothing restored, or MLflow has the best epoch already (the usual case)
        best_row = next(row for row in restored.history if row["epoch"] == best_epoch)
        outputs = restored.best_val_outputs
        scores = None  # a checkpoint written before the outputs were kept has none
        if outputs:
            scores = EvalOutputs(probs=outputs["probs"].numpy(),
                                 targets=outputs["targets"].numpy())
        with tempfile.TemporaryDirectory(prefix="crackray-restored-") as folder:
            best_file = checkpointer.best_model_file(Path(folder), best_weights, restored)
            self._log_best(tracker, best_epoch, best_row, scores, best_file)

    def log_epoch(self, epoch: int, metrics: dict, val: EvalOutputs, improved: bool,
                  best_file: Path | None, model: torch.nn.Module, device) -> None:
        run_hooks(self.hooks, f"log{epoch}", 0)
        self.tracker.log_metrics(self.run_id, _numeric(metrics), step=epoch)
        if improved:
            self._log_best(self.tracker, epoch, metrics, val, best_file)
        last = metrics["early_stopped"] or epoch == self.cfg.train.epochs - 1
        if self.examples is not None and ((epoch + 1) % self.cfg.train.log_masks_every == 0
                                          or last):
            fig = mask_overlay_figure(checkpoints.unwrap(model), self.examples,
                                      metrics["val/pixel_threshold"],
                                      f"val-epoch-{epoch:04d}", device)
            self.tracker.log_artifacts(self.run_id, {f"masks/val-epoch-{epoch:04d}.png": fig})

    def _log_best(self, tracker: Tracker, epoch: int, metrics: dict,
                  scores: EvalOutputs | None, best_file: Path) -> None:
        if scores is not None:
            tracker.log_artifacts(self.run_id, decision_artifacts(scores, 0.5, "val"))
        tracker.log_artifact(self.run_id, best_file, "checkpoints")
        tracker.log_best_model(self.run_id, best_file, step=epoch,
                               tags={"val/objective": metrics.get("val/objective")})
        tracker.set_tags(self.run_id, {BEST_EPOCH_TAG: epoch})

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
