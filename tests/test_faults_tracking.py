"""Tracking server trouble (issue 7, item 4), against a real `mlflow server` on 127.0.0.1.

Unreachable at start: a clear error, fast, before Ray or any trial starts. Lost mid-run:
training goes on, writes are buffered with a warning and sent when the server is back; the run
completes with every epoch's metrics in MLflow exactly once, and no secret reaches it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from fault_hooks import environment

from crackray.cli import main
from crackray.tracking import Tracker

pytestmark = pytest.mark.faults
EPOCHS = 3
PASSWORD, TOKEN = "pw-S3CRET-uri", "tok-S3CRET-env"

EXPERIMENT = """\
base:
  data: {{path: {data}, synthetic_if_missing: true, synthetic_n: 60, image_size: 32}}
  model: {{name: simple_cnn}}
  optim: {{scheduler: none}}
  train: {{epochs: {epochs}, workers: 1, batch_size: 16, early_stopping_patience: 10}}
search:
  optim.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
tune: {{num_samples: 1, workers_per_trial: 1, scheduler: {{name: fifo}}}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", ["train", "tune"])
def test_unreachable_server_fails_fast_before_anything_starts(tmp_path, command, monkeypatch):
    ray_starts = []  # a session-wide Ray may already run in this process: watch the CLI's own
    for module in ("crackray.train.driver", "crackray.tune.job"):
        monkeypatch.setattr(f"{module}.ensure_ray", lambda *a, **k: ray_starts.append(a))

    (tmp_path / "exp.yaml").write_text(EXPERIMENT.format(data=tmp_path / "data", epochs=1))
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}"  # nothing listens there

    start = time.monotonic()
    done = CliRunner().invoke(main, [command, str(tmp_path / "exp.yaml"), "--tracking-uri", uri])
    seconds = time.monotonic() - start

    assert done.exit_code == 2, done.output
    line = done.stderr.strip()
    assert line.startswith("error: MLflow tracking store http://alice:***@127.0.0.1:")
    assert "unreachable" in line and "\n" not in line and PASSWORD not in line
    assert seconds < 60  # MLflow's own retry loop alone would take minutes
    assert ray_starts == []  # failed before Ray, so before any trial


class MlflowServer:
    """`mlflow server` over a sqlite store in tmp, stoppable and restartable on one port."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture()
def server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.3)


@pytest.mark.slow
def test_server_lost_mid_run_then_back_loses_nothing(tmp_path, server):
    faults = tmp_path / "faults"
    faults.mkdir()
    for epoch in (1, 2):
        (faults / f"epoch{epoch}.hold").touch()
    (tmp_path / "exp.yaml").write_text(EXPERIMENT.format(data=tmp_path / "data", epochs=EPOCHS))
    uri = server.url.replace("://", f"://alice:{PASSWORD}@")
    env = {**os.environ, **environment(faults), "MLFLOW_TRACKING_TOKEN": TOKEN}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "crackray"), "train", "exp.yaml",
         "--tracking-uri", uri],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(faults / "epoch1.rank0.pid", process)  # epoch 0 logged; in epoch 1
        server.stop()
        (faults / "epoch1.hold").unlink()  # epoch 1 is reported while the server is away
        wait_for(faults / "epoch2.rank0.pid", process)
        server.start()
        (faults / "epoch2.hold").unlink()
        stdout, stderr = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 0, stderr[-3000:]
    assert "buffering tracking writes and retrying" in stderr
    assert PASSWORD not in stdout + stderr
    tracker = Tracker(server.url)
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    (run,) = tracker.client.search_runs(experiments, "tags.`crackray.kind` = 'train'")
    assert run.info.status == "FINISHED"
    for key in ("val/f1", "val/loss", "train/loss"):
        steps = sorted(m.step for m in tracker.client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(EPOCHS)), f"{key}: {steps}"
    assert "test/f1" in run.data.metrics
    artifacts = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/best_model.pt" in artifacts
    # No secret from the URI or the environment in the run's params or tags.
    assert run.data.params["tracking.uri"] == uri.replace(PASSWORD, "***")
    logged = {**run.data.params, **run.data.tags}
    assert not {k: v for k, v in logged.items() if "S3CRET" in f"{k}={v}"}
