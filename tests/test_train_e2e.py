"""`crackray train` end to end on real SDNET2018 tiles: 2 CPU workers, one MLflow run with
params, per-epoch metrics, test metrics and artifacts; then a run SIGKILLed after its first
epoch's checkpoint that `--resume` finishes without repeating an epoch.

One scenario, two CLI processes: the killed-and-resumed run is also the run whose MLflow
contents are checked, so the resumed run is held to everything a clean run must deliver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from crackray import checkpoints
from crackray.data.prepare import prepare_sdnet2018
from tests.conftest import REPO, SDNET, require

pytestmark = pytest.mark.slow

EXPERIMENT_FILE = REPO / "search_spaces" / "sdnet_classifier.yaml"
EXPERIMENT = "sdnet_classifier"  # the file's stem
OVERRIDES = ["data.path=data/sdnet2018", "model.name=simple_cnn", "model.pretrained=false",
             "data.image_size=32", "train.epochs=2", "train.workers=2", "train.batch_size=32",
             "optim.lr=3e-3",
             "optim.warmup_epochs=0"]
PER_EPOCH = [f"{split}/{name}" for split in ("train", "val") for name in ("loss",)] + [
    f"val/{name}" for name in ("accuracy", "precision", "recall", "f1", "auroc")]
TEST_METRICS = [f"test/{name}" for name in ("loss", "accuracy", "precision", "recall", "f1",
                                            "auroc", "samples")]
ARTIFACTS = ["config.yaml", "checkpoints/best_model.pt", "val/confusion_matrix.png",
             "val/confusion_matrix.json", "val/pr_curve.png", "val/roc_curve.png",
             "test/confusion_matrix.png", "test/confusion_matrix.json", "test/pr_curve.png",
             "test/roc_curve.png"]


def copy_real_subset(dst: Path, every: int = 6) -> Path:
    """Every 6th real tile of each SDNET folder (500 tiles): real data, a sixth of the time."""
    for folder in sorted(p for p in require(SDNET).glob("*/*") if p.is_dir()):
        target = dst / folder.relative_to(SDNET)
        target.mkdir(parents=True)
        for path in sorted(folder.glob("*.jpg"))[::every]:
            shutil.copy(path, target / path.name)
    return dst


def start_train(workdir: Path, env: dict, log: Path, *extra: str) -> subprocess.Popen:
    args = [str(Path(sys.executable).parent / "crackray"), "train", str(EXPERIMENT_FILE)]
    for pair in OVERRIDES:
        args += ["--set", pair]
    # Output to a file: Ray's progress bars would fill a pipe and block the child.
    # A new session, so that a kill reaches the local Ray it starts and nothing else.
    return subprocess.Popen([*args, *extra], cwd=workdir, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def latest_checkpoint(storage: Path) -> dict | None:
    """The latest checkpoint Ray Train has registered (not merely started to write)."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (ValueError, KeyError, TypeError):
            return None  # being rewritten: look again
    return None


def kill_after_first_checkpoint(proc: subprocess.Popen, storage: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = latest_checkpoint(storage)
        if latest and latest["checkpoint_dir_name"] == "epoch-0000":
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray, the workers
            proc.wait(timeout=60)
            return latest["metrics"]
        if proc.poll() is not None:
            pytest.fail(f"train exited ({proc.returncode}) before the first checkpoint")
        time.sleep(0.2)
    pytest.fail("no epoch-0000 checkpoint in time")


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    data = prepare_sdnet2018(copy_real_subset(work / "src"), work / "data" / "sdnet2018", seed=0)
    # Ray's own temp dir: a SIGKILLed local Ray leaves session files that must not reach
    # anyone else's `ray.init()`; short, because Ray's socket paths must stay < 108 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="cr-e2e-", dir="/tmp")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    started = []
    try:
        # Generous limits: about a minute each on an idle 2-core machine, far more when shared.
        started.append(start_train(work, env, work / "first.log"))
        epoch0 = kill_after_first_checkpoint(started[0], work / "ray_results", timeout=600)
        started.append(start_train(work, env, work / "second.log", "--resume"))
        assert started[1].wait(timeout=600) == 0, (work / "second.log").read_text()[-3000:]
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return work, data, epoch0, (work / "second.log").read_text()


@pytest.fixture(scope="module")
def mlflow_client(resumed_run):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{resumed_run[0] / 'mlflow.db'}")


def the_run(client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # resume reused the killed run
    return runs[0]


def test_one_finished_run_with_params(resumed_run, mlflow_client):
    work, manifest, _, output = resumed_run
    run = the_run(mlflow_client)
    assert run.info.status == "FINISHED"
    assert run.info.run_id in output
    params = run.data.params
    assert params["model.name"] == "simple_cnn"
    assert params["data.image_size"] == "32"
    assert params["train.workers"] == "2"
    assert params["data.path"] == str(work / "data" / "sdnet2018")
    assert params["data.digest"] == manifest["digest"]
    assert len(params["git_commit"]) >= 7
    assert params["version.torch"] and params["version.ray"] and params["version.mlflow"]


def test_each_epoch_logged_exactly_once_and_not_rerun(resumed_run, mlflow_client):
    _, _, epoch0, _ = resumed_run
    run_id = the_run(mlflow_client).info.run_id
    for key in PER_EPOCH:
        steps = sorted(m.step for m in mlflow_client.get_metric_history(run_id, key))
        assert steps == [0, 1], (key, steps)
    # Epoch 0's numbers are the ones of the killed process's checkpoint: it was not rerun
    # (a rerun would take a different time and shuffle).
    (seconds,) = [m.value for m in mlflow_client.get_metric_history(run_id, "train/seconds")
                  if m.step == 0]
    assert seconds == pytest.approx(epoch0["train/seconds"])


def test_validation_and_test_metrics_are_complete(resumed_run, mlflow_client):
    _, manifest, _, _ = resumed_run
    metrics = the_run(mlflow_client).data.metrics
    for key in PER_EPOCH + TEST_METRICS:
        assert key in metrics, key
    assert metrics["val/samples"] == manifest["totals"]["val"]["samples"]
    assert metrics["test/samples"] == manifest["totals"]["test"]["samples"]
    for key in ("val/f1", "val/auroc", "test/f1", "test/auroc", "test/tuned/f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert {"test/surface/D/f1", "test/surface/P/f1", "test/surface/W/f1"} <= set(metrics)


def test_artifacts_and_best_checkpoint(resumed_run, mlflow_client, tmp_path):
    run = the_run(mlflow_client)
    root = Path(mlflow_client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert set(ARTIFACTS) <= present, sorted(present)
    matrix = json.loads((root / "test/confusion_matrix.json").read_text())["matrix"]
    assert sum(map(sum, matrix)) == resumed_run[1]["totals"]["test"]["samples"]
    model, cfg, payload = checkpoints.build_model_from_file(root / "checkpoints/best_model.pt")
    assert cfg.model.name == "simple_cnn" and cfg.data.image_size == 32
    assert payload["epoch"] == int(run.data.tags["crackray.best_epoch"])


def test_a_train_worker_imports_no_matplotlib():
    # Every Train worker of every trial imports the worker module; matplotlib (0.6 s) is
    # only for rank 0's figures.
    code = "import sys, crackray.train.worker; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False"]
