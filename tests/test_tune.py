"""Tuning jobs end to end: MLflow parent + one child per trial, ASHA pruning reaching Optuna
as PRUNED, and resume after the driver is SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from crackray.config import load_experiment
from tests.conftest import REPO

pytestmark = pytest.mark.slow

TINY_BASE = {
    "data": {
        "path": "data/demo",
        "synthetic_if_missing": True,
        "synthetic_n": 96,
        "image_size": 32,
    },
    "model": {"name": "test_tiny"},
    "train": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 5},
}


def write_space(folder: Path, *, search: dict, tune: dict, base: dict | None = None) -> Path:
    path = folder / "tiny.yaml"
    # One worker a trial: these tests are about pruning and resume; 2-worker trials are the
    # session's tiny job (tests/conftest.py).
    tune = {"workers_per_trial": 1, "cpus_per_worker": 0.5, "max_concurrent_trials": 1, **tune}
    path.write_text(yaml.safe_dump({"base": base or TINY_BASE, "search": search, "tune": tune}))
    return path


def runs_of(store: Path, kind: str, experiment: str = "tiny"):
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`crackray.kind` = '{kind}'"
    )


def test_a_job_gives_one_parent_and_a_child_run_per_trial(tiny_tune_job):
    """The session's tiny job (`quickstart.yaml`, 2 trials of 1 epoch on 2 workers)."""
    assert "top trials by val/objective" in (tiny_tune_job.folder / "tune.stdout").read_text()
    client = MlflowClient(tiny_tune_job.uri)
    parents, children = (runs_of(tiny_tune_job.db, kind, "quickstart")
                         for kind in ("tune", "trial"))
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"quickstart.yaml", "trials.csv", "best_trial.json", "params"} <= parent_files
    searched = load_experiment(REPO / "search_spaces" / "quickstart.yaml").search
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "params")} == {
        f"params/{key}.png" for key in searched}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        for key in ("val/objective", "val/ap", "val/f1", "val/recall", "val/precision",
                    "val/auroc", "val/loss", "train/loss"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert steps == [0], (key, steps)
        files = {f.path for f in client.list_artifacts(child.info.run_id, "val")}
        assert "val/confusion_matrix.png" in files and "val/confusion_matrix.json" in files
        assert [f.path for f in client.list_artifacts(child.info.run_id, "checkpoints")] == [
            "checkpoints/best_model.pt"
        ]
    # Each child run logged the values its trial was given: those Optuna sampled.
    job = parent.data.tags["crackray.job_name"]
    optuna_db = tiny_tune_job.folder / "ray_results" / job / "optuna.db"
    study = optuna.load_study(study_name=job, storage=f"sqlite:///{optuna_db}")
    sampled = sorted(_values(t.params[k] for k in searched) for t in study.trials)
    logged = sorted(_values(c.data.params[k] for k in searched) for c in children)
    assert logged == sampled
    best_id = parent.data.tags["crackray.best_run_id"]
    best = client.get_run(best_id)
    assert "test/f1" in best.data.metrics and "test/tuned/f1" in best.data.metrics
    # The best trial has the highest val/objective at its best epoch (ties allowed).
    best_objective = {c.info.run_id: max(m.value for m in client.get_metric_history(
        c.info.run_id, "val/objective")) for c in children}
    assert best_objective[best_id] == max(best_objective.values())


def driver_pids(job_folder: Path) -> dict[str, set[int]]:
    """The driver process ids each trial of a Tune job folder reported, by trial folder."""
    return {
        results.parent.name: {json.loads(row)["pid"] for row in results.read_text().splitlines()}
        for results in job_folder.glob("*/result.json")
    }


def test_a_finished_trial_hands_its_driver_process_to_the_next(tiny_tune_job):
    """`reuse_actors`: the second trial runs in the first one's driver process, which has
    Python, Ray, torch and MLflow loaded already (README "Performance")."""
    (parent,) = runs_of(tiny_tune_job.db, "tune", "quickstart")
    pids = driver_pids(tiny_tune_job.folder / "ray_results" / parent.data.tags["crackray.job_name"])
    assert len(pids) == 2, pids
    assert len(set().union(*pids.values())) == 1, pids


def _values(values) -> tuple[str, ...]:
    """Sampled or logged (string) values, comparable: numbers rounded to 12 digits."""
    return tuple(map(_comparable, values))


def _comparable(value) -> str:
    try:
        return f"{float(value):.12g}"
    except ValueError:
        return str(value)


def test_asha_prunes_a_trial_and_optuna_records_it(tmp_path, cli):
    # A sane learning rate first, then a tiny one (fixed starting points, so the test does not
    # hang on what the sampler draws): one trial at a time, the tiny-lr trial reaches the first
    # rung with a val/objective (AP) near chance, worse than the first trial's, and ASHA stops
    # it there. A third trial then runs in the stopped trial's driver process (reuse_actors:
    # its Train run is aborted first, crackray.tune.reuse).
    space = write_space(
        tmp_path,
        search={"optim.lr": {"type": "categorical", "choices": [1e-7, 1e-2]}},
        tune={
            "num_samples": 3,  # just the points below
            "seed": 3,
            "points_to_evaluate": [{"optim.lr": 1e-2}, {"optim.lr": 1e-7}, {"optim.lr": 1e-2}],
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        },
        base={**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 3}},
    )
    result = cli("tune", space)
    assert result.returncode == 0, result.stderr[-3000:]
    children = runs_of(tmp_path / "mlflow.db", "trial")
    statuses = {
        c.data.tags["crackray.trial_id"]: c.data.tags["crackray.trial_status"] for c in children
    }
    pruned = [t for t, s in statuses.items() if s == "pruned"]
    assert pruned, statuses
    tiny_lr = [c for c in children if float(c.data.params["optim.lr"]) == 1e-7]
    assert tiny_lr and all(c.data.tags["crackray.trial_status"] == "pruned" for c in tiny_lr)
    for child in children:
        if child.data.tags["crackray.trial_status"] == "pruned":
            assert child.info.status == "KILLED"

    job = runs_of(tmp_path / "mlflow.db", "tune")[0].data.tags["crackray.job_name"]
    study = optuna.load_study(
        study_name=job, storage=f"sqlite:///{tmp_path / 'ray_results' / job / 'optuna.db'}"
    )
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == len(pruned)
    assert states.count(optuna.trial.TrialState.COMPLETE) == len(children) - len(pruned)

    assert len(children) == 3
    assert "failed" not in [c.data.tags["crackray.trial_status"] for c in children]
    pids = driver_pids(tmp_path / "ray_results" / job)
    assert len(pids) == 3 and len(set().union(*pids.values())) == 1, pids


def test_resume_after_sigkill_does_not_rerun_finished_trials(tmp_path):
    space = write_space(
        tmp_path,
        search={"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        tune={"num_samples": 2, "scheduler": {"name": "fifo"}},
    )
    crackray = str(Path(sys.executable).parent / "crackray")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    driver = subprocess.Popen(
        [crackray, "tune", str(space)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # The second trial's Train run folder appears once the first trial has finished.
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            runs = list((tmp_path / "ray_results").glob("*/train_runs/*"))
            if len(runs) >= 2:
                break
            assert driver.poll() is None, "tuning job ended before it could be killed"
            time.sleep(1)
        else:
            pytest.fail("second trial never started")
        time.sleep(8)  # let Tune write its experiment state with the finished trial
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()

    first = runs_of(tmp_path / "mlflow.db", "trial")
    assert len(first) >= 1
    resumed = subprocess.run(
        [crackray, "tune", str(space), "--resume"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    parents = runs_of(tmp_path / "mlflow.db", "tune")
    children = runs_of(tmp_path / "mlflow.db", "trial")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/f1")]
        assert sorted(steps) == [0, 1], steps  # no epoch trained (or logged) twice
