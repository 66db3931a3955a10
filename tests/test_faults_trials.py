"""Trial failures and interrupts of a tuning job (issue 7, items 2 and 3), through the real
`crackray tune` command (its own local Ray) with test-only faults injected in the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fault_hooks import environment as fault_environment

from crackray.tracking import Tracker

pytestmark = [pytest.mark.faults, pytest.mark.slow]
EPOCHS = 2

EXPERIMENT = """\
base:
  data: {{path: data, synthetic_if_missing: true, synthetic_n: 60, image_size: 32}}
  model: {{name: simple_cnn}}
  optim: {{scheduler: none}}
  train: {{epochs: {epochs}, batch_size: 16, early_stopping_patience: 10}}
  tracking: {{experiment: faults}}
search:
  optim.lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
tune:
  name: faults
  num_samples: 2
  max_concurrent_trials: 1
  scheduler: {{name: fifo}}
  workers_per_trial: 1
  max_failures: 1
"""


def crackray(tmp_path: Path, *args: str) -> list[str]:
    return [str(Path(os.sys.executable).parent / "crackray"), *args]


def environment(tmp_path: Path, faults: Path) -> dict:
    env = {**os.environ, **fault_environment(faults),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return env


@pytest.fixture()
def job(tmp_path) -> tuple[Path, Path]:
    (tmp_path / "exp.yaml").write_text(EXPERIMENT.format(epochs=EPOCHS))
    faults = tmp_path / "faults"
    faults.mkdir()
    return tmp_path, faults


def runs_of_job(tmp_path: Path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.latest_run("faults", kind="tune")
    return tracker, parent, tracker.child_runs(parent.info.run_id, kind="trial")


def assert_each_epoch_once(tracker: Tracker, run_id: str) -> None:
    for key in ("val/f1", "train/loss"):
        steps = sorted(m.step for m in tracker.client.get_metric_history(run_id, key))
        assert steps == list(range(EPOCHS)), f"{run_id} {key}: {steps}"


def test_failing_trials_are_retried_then_marked_failed(job):
    tmp_path, faults = job
    # Rank 0 raises at start three times: trial 1 fails twice (> max_failures: FAILED),
    # trial 2 fails once and succeeds on its retry.
    (faults / "start.raise").write_text("3")

    done = subprocess.run(crackray(tmp_path, "tune", "exp.yaml"), cwd=tmp_path,
                          env=environment(tmp_path, faults), capture_output=True, text=True,
                          timeout=1500)

    assert done.returncode == 0, done.stderr[-3000:]
    assert (faults / "start.raise").read_text() == "0"  # all three faults were injected
    tracker, parent, trials = runs_of_job(tmp_path)
    assert parent.info.status == "FINISHED"
    assert len(trials) == 2
    failed = [t for t in trials if t.info.status == "FAILED"]
    finished = [t for t in trials if t.info.status == "FINISHED"]
    assert len(failed) == 1 and len(finished) == 1
    assert failed[0].data.tags["crackray.trial_status"] == "failed"
    assert "injected test fault at start" in failed[0].data.tags["crackray.error"]
    assert finished[0].data.tags["crackray.trial_status"] == "finished"
    assert_each_epoch_once(tracker, finished[0].info.run_id)
    assert parent.data.tags["crackray.best_run_id"] == finished[0].info.run_id


def test_sigint_leaves_a_resumable_job_and_resume_finishes_it(job):
    tmp_path, faults = job
    env = environment(tmp_path, faults)
    (faults / "epoch1.hold").touch()  # trial 1 waits mid-epoch 1: epoch 0 is checkpointed
    process = subprocess.Popen(crackray(tmp_path, "tune", "exp.yaml"), cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not (faults / "epoch1.rank0.pid").exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "trial 1 never reached epoch 1"
            time.sleep(0.5)
        interrupted_at = time.time()
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    (faults / "epoch1.hold").unlink()

    assert process.returncode == 2, stderr[-3000:]
    # Ray's log forwarding may print after it; the message itself is one line.
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith("error: tuning job faults-") and "--resume" in errors[0]
    tracker, parent, trials = runs_of_job(tmp_path)
    assert parent.info.status == "KILLED"
    assert [t.info.status for t in trials] == ["KILLED"]
    assert trials[0].data.tags["crackray.trial_status"] == "interrupted"
    interrupted_run = trials[0].info.run_id

    done = subprocess.run(crackray(tmp_path, "tune", "exp.yaml", "--resume"), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1500)

    assert done.returncode == 0, done.stderr[-3000:]
    tracker, resumed, trials = runs_of_job(tmp_path)
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    assert len(trials) == 2 and trials[0].info.run_id == interrupted_run
    assert [t.info.status for t in trials] == ["FINISHED", "FINISHED"]
    for trial in trials:
        assert_each_epoch_once(tracker, trial.info.run_id)
    # Trial 1 went on from its epoch-0 checkpoint: epoch 0 was logged before the interrupt,
    # once, and only epoch 1 after it.
    history = tracker.client.get_metric_history(interrupted_run, "val/f1")
    stamps = {m.step: m.timestamp / 1000 for m in history}
    assert stamps[0] < interrupted_at < stamps[1]
