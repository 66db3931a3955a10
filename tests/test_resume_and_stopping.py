"""Restarts that cannot mix runs, and early stopping that stays stopped (issue 14)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from click.testing import CliRunner

from crackray.cli import main
from crackray.config import RunConfig
from crackray.data.prepare import prepare_synthetic
from crackray.errors import ConfigError
from crackray.runs import RESUMABLE_KEYS, check_resumable, run_params
from crackray.tracking import safe_params
from crackray.train.state import TrainingState

MANIFEST = {"digest": "abc", "dataset": "synthetic"}


def logged(cfg: RunConfig, manifest=MANIFEST) -> dict[str, str]:
    return safe_params(run_params(cfg, manifest))


def test_a_changed_config_or_dataset_is_refused_naming_the_keys():
    before = RunConfig()
    changed = RunConfig.model_validate({"optim": {"lr": 0.5}, "data": {"image_size": 96}})
    with pytest.raises(ConfigError) as error:
        check_resumable(logged(before), run_params(changed, MANIFEST))
    message = str(error.value)
    assert "optim.lr" in message and "data.image_size" in message and "\n" not in message
    with pytest.raises(ConfigError, match="data.digest"):
        check_resumable(logged(before), run_params(before, {**MANIFEST, "digest": "other"}))
    # The tuning job's parent logs its base under "base.".
    prefixed = {f"base.{k}": v for k, v in logged(before).items()}
    with pytest.raises(ConfigError, match="optim.lr"):
        check_resumable(prefixed, run_params(changed, MANIFEST), prefix="base.")


def test_the_documented_keys_may_change():
    assert "train.epochs" in RESUMABLE_KEYS
    more = RunConfig.model_validate({"train": {"epochs": 40, "max_failures": 3}})
    check_resumable(logged(RunConfig()), run_params(more, MANIFEST))  # no error


def test_train_resume_with_nothing_to_resume_is_one_line(tmp_path):
    prepare_synthetic(tmp_path / "data", n=40, seed=0, image_size=32)
    (tmp_path / "exp.yaml").write_text(
        f"base: {{data: {{path: {tmp_path / 'data'}, image_size: 32}}}}\n")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "exp.yaml"), "--resume",
                                       "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --resume: no unfinished training")
    assert "Traceback" not in result.output


def test_early_stopping_survives_a_restart():
    state = TrainingState()
    for epoch, score in enumerate([0.5, 0.4, 0.45]):
        state.record(epoch, {}, score, min_delta=0.0, patience=2)
    assert state.stopped_early and state.best_epoch == 0
    restored = TrainingState(**asdict(state))  # what a checkpoint gives back
    assert list(restored.epochs_left(10)) == []
    fresh = TrainingState()
    fresh.record(0, {}, 0.5, min_delta=0.0, patience=2)
    assert list(TrainingState(**asdict(fresh)).epochs_left(4)) == [1, 2, 3]


@pytest.mark.slow
def test_early_stopping_fires_in_a_real_run(ray_session, tmp_path):
    from crackray.tracking import Tracker
    from crackray.train.driver import run_training

    prepare_synthetic(tmp_path / "data", n=96, seed=0, image_size=32)
    cfg = RunConfig.model_validate({
        "data": {"path": str(tmp_path / "data"), "image_size": 32},
        "model": {"name": "test_tiny"},
        # A learning rate that cannot move the objective by the min_delta: no epoch after
        # the first improves, so patience 1 stops the run after its second epoch of five.
        "optim": {"lr": 1e-12, "scheduler": "none"},
        "train": {"epochs": 5, "workers": 2, "batch_size": 16, "early_stopping_patience": 1,
                  "early_stopping_min_delta": 0.05},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
    result = run_training(cfg, storage_path=str(tmp_path / "ray_results"), experiment="stop")
    assert [row["epoch"] for row in result.history] == [0, 1]
    tracker = Tracker(cfg.tracking.uri)
    assert tracker.metric_history(result.run_id, "early_stopped") == {0: 0.0, 1: 1.0}
    assert sorted(tracker.metric_history(result.run_id, "val/objective")) == [0, 1]
