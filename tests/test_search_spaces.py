"""Every search-space file loads, validates and converts; bad files fail before Ray starts."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from conftest import sampled_distributions

from crackray.config import load_experiment
from crackray.errors import ConfigError
from crackray.tune.resources import plan_resources
from crackray.tune.space import check_search_values

SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_there_are_search_spaces():
    names = {p.name for p in SPACES}
    assert {"quickstart.yaml", "sdnet_classifier.yaml"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_search_space_converts_one_to_one(path):
    experiment = load_experiment(path)
    check_search_values(experiment)
    distributions = sampled_distributions(experiment)
    assert set(distributions) == set(experiment.search)  # every entry reachable
    for key, dist in experiment.search.items():
        converted = distributions[key]
        if dist.type == "categorical":
            assert isinstance(converted, optuna.distributions.CategoricalDistribution)
            assert list(converted.choices) == dist.choices
        else:
            assert converted.low == dist.low and converted.high == dist.high
            assert converted.log == dist.log


def _write(tmp_path, search: dict, base: dict | None = None) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base": base or {}, "search": search, "tune": {}}))
    return path


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"optim.lr": {"type": "beta", "low": 0.1, "high": 1}}, "search.optim.lr.type"),
        ({"optim.lr": {"type": "float", "low": 1.0, "high": 0.1}}, "low (1.0) must be <= high"),
        (
            {"optim.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}},
            "log scale needs low > 0",
        ),
        (
            {"optim.learning_rate": {"type": "float", "low": 0.1, "high": 1}},
            "'optim.learning_rate' is not a key of base",
        ),
        ({"loss.name": {"type": "categorical", "choices": []}}, "non-empty 'choices'"),
    ],
)
def test_bad_search_space_names_the_key(tmp_path, search, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, search))
    assert message in str(err.value)
    assert str(tmp_path / "space.yaml") in str(err.value)


def test_unknown_base_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"base\.optim\.learning_rate: unknown key"):
        load_experiment(_write(tmp_path, {}, base={"optim": {"learning_rate": 0.1}}))


def test_searched_value_that_does_not_validate(tmp_path):
    path = _write(
        tmp_path, {"model.name": {"type": "categorical", "choices": ["simple_cnn", "vgg99"]}}
    )
    with pytest.raises(ConfigError, match="vgg99"):
        check_search_values(load_experiment(path))


def test_bad_file_fails_before_ray_starts(tmp_path, cli):
    path = _write(tmp_path, {"optim.lr": {"type": "float", "low": 1.0, "high": 0.1}})
    ray_root = tmp_path / "ray-tmp"  # where a local Ray started by this CLI would live
    result = cli("tune", path, env={"RAY_TMPDIR": str(ray_root)})
    assert result.returncode == 2
    assert "low (1.0) must be <= high" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ray_results").exists()
    assert not ray_root.exists()


def test_resource_plan_on_two_cpus_leaves_cpu_for_ingest():
    experiment = load_experiment(SPACES[[p.name for p in SPACES].index("quickstart.yaml")])
    plan = plan_resources(experiment.tune, {"CPU": 2.0})
    assert plan.concurrent_trials == 1
    assert plan.cpus_for_training == 1.0
    assert plan.cpus_for_ingest >= 1.0
    assert plan.driver_bundle["CPU"] == 0 and plan.driver_bundle["memory"] > 0


def test_resource_plan_scales_with_the_cluster_and_gpus():
    experiment = load_experiment(SPACES[[p.name for p in SPACES].index("quickstart.yaml")])
    tune_cfg = experiment.tune.model_copy(
        update={"max_concurrent_trials": 8, "gpus_per_worker": 1.0, "cpus_per_worker": 2.0}
    )
    plan = plan_resources(tune_cfg, {"CPU": 32.0, "GPU": 4.0})
    assert plan.concurrent_trials == 2  # 4 GPUs / (2 workers x 1 GPU)
    assert plan.cpus_for_ingest == 32.0 - 2 * 2 * 2.0


def test_resource_plan_that_cannot_fit_is_a_clear_error():
    experiment = load_experiment(SPACES[[p.name for p in SPACES].index("quickstart.yaml")])
    tune_cfg = experiment.tune.model_copy(update={"workers_per_trial": 4, "cpus_per_worker": 1.0})
    with pytest.raises(ConfigError, match="lower tune.workers_per_trial"):
        plan_resources(tune_cfg, {"CPU": 2.0})
