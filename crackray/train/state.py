"""A worker's progress across epochs and restarts: early stopping, the best weights so far,
and the epoch checkpoints it writes and restores."""

from __future__ import annotations

import contextlib
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.fs
import ray.train
import torch

from crackray import checkpoints
from crackray.config import RunConfig


@dataclass
class TrainingState:
    """What must survive a restart besides weights: progress, early stopping, history."""

    next_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)
    # Rank 0: the best epoch's validation probabilities and targets (tensors), from which a
    # restarted worker redraws that epoch's MLflow artifacts if it died before logging them.
    best_val_outputs: dict = field(default_factory=dict)

    def record(self, epoch: int, metrics: dict, score: float, min_delta: float,
               patience: int) -> bool:
        """Store the epoch's metrics; True if `score` beats the best by more than min_delta.
        Sets `stopped_early` once `patience` epochs in a row did not improve."""
        self.history.append({"epoch": epoch, **metrics})
        self.next_epoch = epoch + 1
        improved = not math.isnan(score) and score > self.best_score + min_delta
        if improved:
            self.best_score, self.best_epoch, self.stale_epochs = score, epoch, 0
        else:
            self.stale_epochs += 1
        self.stopped_early = self.stale_epochs >= patience
        return improved

    def epochs_left(self, epochs: int) -> range:
        """The epochs still to train; none once early stopping fired, also after a restart."""
        return range(epochs if self.stopped_early else self.next_epoch, epochs)


def restart_candidates(run_folder: str | None) -> list[tuple[ray.train.Checkpoint, bool]]:
    """Checkpoints to restart from, best first, each with whether the controller registered
    it: epoch folders of this run newer than Ray's latest registered checkpoint, then that
    one. The controller registers a report only at its next poll of the workers, so a worker
    dying in between loses the registration, yet rank 0 has already written that checkpoint
    and may have logged its epoch to MLflow: restarting from the older one would train and
    log that epoch twice."""
    registered = ray.train.get_checkpoint()
    newer = []
    if run_folder:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(run_folder)
        selector = pyarrow.fs.FileSelector(root, allow_not_found=True)
        known = Path(registered.path).name if registered else ""
        folders = sorted(
            (
                e.path
                for e in filesystem.get_file_info(selector)
                if e.type == pyarrow.fs.FileType.Directory
                and e.base_name.startswith("epoch-")
                and e.base_name > known
            ),
            reverse=True,
        )
        newer = [(ray.train.Checkpoint(path, filesystem=filesystem), False) for path in folders]
    return newer + ([(registered, True)] if registered else [])


class Checkpointer:
    """Writes one checkpoint folder per epoch (rank 0: latest state + best model file) and
    restores the newest readable one after a restart."""

    def __init__(self, cfg: RunConfig, run_folder: str | None, rank: int,
                 tile: int | None = None):
        self.cfg, self.run_folder, self.rank, self.tile = cfg, run_folder, rank, tile

    def restore(self, model, optimizer, schedule
                ) -> tuple[TrainingState, dict | None, ray.train.Checkpoint | None]:
        """Load the newest readable checkpoint into model / optimizer / schedule; returns the
        training state, the best weights so far (fresh ones if there is nothing) and, if the
        controller never registered the restored checkpoint, that checkpoint (for
        `report_again`)."""
        for checkpoint, registered in restart_candidates(self.run_folder):
            try:
                with checkpoint.as_directory() as folder:
                    saved = torch.load(Path(folder) / checkpoints.STATE_FILE, weights_only=True)
                    best = checkpoints.load_model_file(Path(folder) / checkpoints.BEST_FILE)
            except Exception as exc:  # noqa: BLE001 - half-written by a dying worker: try older
                warnings.warn(f"skipping unreadable checkpoint {checkpoint.path}: {exc}",
                              stacklevel=1)
                continue
            checkpoints.unwrap(model).load_state_dict(saved["model_state"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            unregistered = None if registered else checkpoint
            return TrainingState(**saved["training_state"]), best["model_state"], unregistered
        return TrainingState(), None, None

    def report_again(self, state: TrainingState, checkpoint: ray.train.Checkpoint) -> None:
        """Report a restored checkpoint's epoch once more (every rank calls this): its report
        died with a worker before the controller registered it, so neither Tune nor `fit()`'s
        result has seen that epoch, and after the last epoch no later report would make up
        for it. The checkpoint is in the run's folder already: registered where it is."""
        ray.train.report({**state.history[-1], "early_stopped": int(state.stopped_early)},
                         checkpoint=checkpoint if self.rank == 0 else None,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)

    @contextlib.contextmanager
    def epoch_checkpoint(self, model, optimizer, schedule, state: TrainingState,
                         best_weights: dict):
        """-> (checkpoint to report, local best model file), both None off rank 0; the files
        live until the block ends (Ray copies them to storage on `report`)."""
        with tempfile.TemporaryDirectory() as folder:
            if self.rank != 0:
                yield None, None
                return
            torch.save(
                {
                    "model_state": checkpoints.cpu_state(model),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "training_state": asdict(state),
                },
                Path(folder) / checkpoints.STATE_FILE,
            )
            best_file = self.best_model_file(Path(folder), best_weights, state)
            yield ray.train.Checkpoint.from_directory(folder), best_file

    def best_model_file(self, folder: Path, best_weights: dict, state: TrainingState) -> Path:
        """The best weights so far as a model file in `folder` (what `predict` and the
        registry load), stamped with their epoch and validation score."""
        return checkpoints.save_model_file(
            folder / checkpoints.BEST_FILE,
            best_weights,
            self.cfg,
            tile=self.tile,
            epoch=state.best_epoch,
            val_score=state.best_score,
        )
