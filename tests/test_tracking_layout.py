"""What the MLflow UI needs to show a training project, on every run a tuning job makes: the
experiment kind tag, one dataset input per split (digest = the manifest's, profile = its
counts), MLflow's source tags, and each trial's best checkpoint as a logged model linked to
its run; plus `crackray ui`'s URL and `--open`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crackray.data.shards import read_manifest
from crackray.tracking import (
    BEST_MODEL,
    BEST_MODEL_TAG,
    DATASET_CONTEXT_TAG,
    EXPERIMENT_KIND_TAG,
    TRAINING_KIND,
    Tracker,
    git_commit,
    runs_table_url,
)

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


@pytest.fixture(scope="module")
def job(tiny_tune_job):
    tracker = Tracker(tiny_tune_job.uri)  # read only
    parent = tracker.latest_run_anywhere("tune")
    return (tiny_tune_job.folder, tracker, parent,
            tracker.child_runs(parent.info.run_id, kind="trial"))


# ------------------------------------------------------------------------- on a real job


@pytest.mark.slow
def test_every_run_carries_the_experiment_kind_datasets_and_source(job):
    folder, tracker, parent, trials = job
    assert len(trials) == 2
    experiment = tracker.client.get_experiment(parent.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    manifest = read_manifest(folder / "data" / "demo")
    for run in [parent, *(tracker.get_run(t.info.run_id) for t in trials)]:
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        assert sorted(inputs) == sorted(f"{manifest['dataset']}/{s}" for s in CONTEXTS)
        for split, context in CONTEXTS.items():
            found = inputs[f"{manifest['dataset']}/{split}"]
            # MLflow's store keeps 36 characters of a digest; the profile holds all of it.
            assert manifest["digest"].startswith(found.dataset.digest)
            assert len(found.dataset.digest) == 36
            profile = json.loads(found.dataset.profile)
            assert profile["manifest_digest"] == manifest["digest"]
            assert {k: profile[k] for k in ("samples", "crack", "no_crack")} == \
                manifest["totals"][split]
            assert profile["surfaces"] == manifest["counts"][split]
            assert {t.key: t.value for t in found.tags} == {DATASET_CONTEXT_TAG: context}
            assert json.loads(found.dataset.source)["uri"] == str(folder / "data" / "demo")
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == git_commit()
        assert tags["mlflow.source.name"].startswith("crackray tune ")
        assert "quickstart.yaml" in tags["mlflow.source.name"]


@pytest.mark.slow
def test_each_trials_best_checkpoint_is_a_logged_model_of_its_run(job):
    _, tracker, parent, trials = job
    for trial in trials:
        run = tracker.get_run(trial.info.run_id)
        models = tracker.client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        assert [m.name for m in models] == [BEST_MODEL]
        model = models[0]
        assert str(model.status).endswith("READY")
        assert run.data.tags[BEST_MODEL_TAG] == model.model_id
        assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
        assert model.tags["crackray.epoch"] == run.data.tags["crackray.best_epoch"]
        # The logged model holds the very file the run's checkpoint artifact holds.
        folder = Path(tracker.download_uri(f"models:/{model.model_id}"))
        logged = tracker.download(run.info.run_id, "checkpoints/best_model.pt")
        assert (folder / "best_model.pt").read_bytes() == logged.read_bytes()
    # The job's parent trains nothing: no logged model of its own.
    assert not tracker.client.search_logged_models(
        [parent.info.experiment_id], filter_string=f"source_run_id = '{parent.info.run_id}'")


# ------------------------------------------------------------------------- no Ray


def test_the_experiment_kind_is_added_to_old_experiments_but_a_users_kind_is_kept(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    old = tracker.client.create_experiment("old")
    mine = tracker.client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    tracker.find_or_create_run("old", "k", run_name="r", kind="train")
    tracker.find_or_create_run("mine", "k", run_name="r", kind="train")
    assert tracker.client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert tracker.client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "finetuning"


def test_a_better_checkpoint_replaces_the_file_of_the_same_logged_model(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    run_id = tracker.find_or_create_run("exp", "k", run_name="r", kind="train")
    checkpoint = tmp_path / "best_model.pt"
    checkpoint.write_bytes(b"epoch 0")
    tracker.log_best_model(run_id, checkpoint, step=0)
    checkpoint.write_bytes(b"epoch 3")
    # A restarted worker: a fresh Tracker finds the run's model instead of making a second.
    Tracker(uri).log_best_model(run_id, checkpoint, step=3, tags={"val/objective": 0.8})
    run = tracker.get_run(run_id)
    models = tracker.client.search_logged_models([run.info.experiment_id])
    assert len(models) == 1 and models[0].tags["crackray.epoch"] == "3"
    assert models[0].tags["val/objective"] == "0.8"
    folder = Path(tracker.download_uri(f"models:/{models[0].model_id}"))
    assert (folder / "best_model.pt").read_bytes() == b"epoch 3"


def test_ui_url_opens_the_runs_table_in_training_mode():
    assert runs_table_url("http://127.0.0.1:5000", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")
    assert runs_table_url("http://h:1/", None) == "http://h:1/"


def test_ui_names_an_unknown_experiment(tmp_path, cli):
    Tracker(f"sqlite:///{tmp_path}/mlflow.db").find_or_create_run("exp", "k", run_name="r",
                                                                  kind="train")
    done = cli("ui", "--experiment", "nope", "--port", "1")
    assert done.returncode == 2
    assert done.stderr.strip().endswith("no MLflow experiment named 'nope' in sqlite:///"
                                        f"{tmp_path}/mlflow.db")


def test_ui_open_hands_the_runs_table_url_to_the_browser(tmp_path):
    """`--open` with $BROWSER set to a recorder: once the server answers, the recorder gets
    the experiment's Runs-table URL, the same one `crackray ui` prints."""
    import socket

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    tracker.find_or_create_run("exp", "k", run_name="r", kind="train")
    experiment_id = tracker.client.get_experiment_by_name("exp").experiment_id
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    opened = tmp_path / "opened.txt"
    recorder = tmp_path / "browser.sh"
    recorder.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    recorder.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DISPLAY")}
    env["BROWSER"] = f"{recorder} %s"
    log = (tmp_path / "ui.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "crackray"), "ui", "--open",
                               "--port", str(port)], cwd=tmp_path, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    expected = runs_table_url(f"http://127.0.0.1:{port}", experiment_id)
    try:
        deadline = time.monotonic() + 180
        while not (opened.exists() and opened.read_text().strip()):
            assert server.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "ui.log").read_text()[-3000:]
            time.sleep(0.5)  # polling for a file another process writes
        assert opened.read_text().strip() == expected
        assert expected in (tmp_path / "ui.log").read_text()
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()
