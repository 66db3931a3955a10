"""Worker loss (issue 7, item 1): SIGKILL of one Ray Train worker in the middle of an epoch.

With `train.max_failures: 1` the worker group restarts from the latest checkpoint and the run
finishes: every configured epoch is reported once, MLflow holds each epoch's metrics exactly
once, and the best-F1 checkpoint agrees with MLflow's best val/f1.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from fault_hooks import environment

from crackray import checkpoints
from crackray.config import RunConfig
from crackray.data.prepare import prepare_synthetic
from crackray.tracking import Tracker
from crackray.train.driver import run_training

pytestmark = [pytest.mark.faults, pytest.mark.slow]
EPOCHS = 3


def wait_for(path: Path, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.2)
    return path.read_text()


def kill_worker_mid_epoch(faults: Path, killed: dict) -> None:
    """Runs beside training: SIGKILL rank 1 while both ranks wait inside epoch 1."""
    try:
        pid = int(wait_for(faults / "epoch1.rank1.pid"))
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid
    finally:
        (faults / "epoch1.hold").unlink()


def test_sigkill_of_a_train_worker_mid_epoch(ray_session, tmp_path, monkeypatch):
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "epoch1.hold").touch()  # workers wait there, trained but not yet reported
    for key, value in environment(faults).items():
        monkeypatch.setenv(key, value)
    prepare_synthetic(tmp_path / "data", n=80, seed=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RunConfig.model_validate({
        "data": {"path": str(tmp_path / "data"), "image_size": 32},
        "model": {"name": "simple_cnn"},
        "optim": {"lr": 1e-2, "scheduler": "none"},
        "train": {"epochs": EPOCHS, "workers": 2, "batch_size": 16, "max_failures": 1,
                  "early_stopping_patience": 10},
        "tracking": {"uri": uri},
    })
    killed: dict = {}
    killer = threading.Thread(target=kill_worker_mid_epoch, args=(faults, killed), daemon=True)
    killer.start()

    result = run_training(cfg, storage_path=str(tmp_path / "ray_results"), experiment="kill")
    killer.join(timeout=5)

    # The fault happened, and a fresh worker re-ran epoch 1.
    assert killed.get("pid"), "the worker was never killed"
    assert int((faults / "epoch1.rank1.pid").read_text()) != killed["pid"]
    assert [row["epoch"] for row in result.history] == list(range(EPOCHS))

    tracker = Tracker(uri)
    run = tracker.client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in ("val/f1", "val/loss", "train/loss", "val/recall"):
        steps = sorted(m.step for m in tracker.client.get_metric_history(result.run_id, key))
        assert steps == list(range(EPOCHS)), f"{key}: {steps}"  # each epoch exactly once
    logged_f1 = tracker.metric_history(result.run_id, "val/f1")
    for row in result.history:
        assert math.isclose(logged_f1[row["epoch"]], row["val/f1"], abs_tol=1e-6)

    # The best checkpoint: intact, and the epoch MLflow says is best by val/objective.
    logged_objective = tracker.metric_history(result.run_id, "val/objective")
    best_epoch = max(logged_objective, key=lambda e: (logged_objective[e], -e))  # first max
    _, _, payload = checkpoints.build_model_from_file(result.best_model)
    assert payload["epoch"] == best_epoch
    assert math.isclose(payload["val_score"], logged_objective[best_epoch], abs_tol=1e-6)
    assert run.data.tags["crackray.best_epoch"] == str(best_epoch)
    logged = tracker.download(result.run_id, "checkpoints/best_model.pt")
    from_mlflow = checkpoints.load_model_file(logged)
    assert from_mlflow["epoch"] == best_epoch
    for name, tensor in payload["model_state"].items():
        assert torch.equal(tensor, from_mlflow["model_state"][name]), name
    assert "test/f1" in run.data.metrics  # the run went on to its test pass
