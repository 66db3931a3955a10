"""Config: YAML + dotted overrides, errors that name the key, search distributions, and the
resolved config round trip. Plus: every experiment file in search_spaces/ loads and converts."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from conftest import sampled_distributions

from crackray.config import (
    ExperimentFile,
    RunConfig,
    load_experiment,
    parse_overrides,
    run_config_from_dict,
    save_resolved,
    with_params,
)
from crackray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, tree: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture()
def experiment_file(tmp_path):
    return write(tmp_path, {
        "base": {"data": {"path": "data/x", "image_size": 64},
                 "model": {"name": "simple_cnn"}, "optim": {"lr": 0.01}},
        "search": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "tune": {"num_samples": 3},
    })


def test_yaml_values_defaults_and_names(experiment_file):
    exp = load_experiment(experiment_file)
    assert exp.base.data.image_size == 64
    assert exp.base.optim.lr == 0.01
    assert exp.base.train.epochs == RunConfig().train.epochs  # untouched keys keep defaults
    assert exp.tune.num_samples == 3
    # the file's stem names the tuning job and the MLflow experiment unless set
    assert exp.tune.name == "exp" and exp.base.tracking.experiment == "exp"


def test_overrides_are_typed_and_win_over_the_file(experiment_file):
    overrides = parse_overrides(["optim.lr=3e-4", "train.epochs=7", "data.balanced_sampling=true",
                                 "model.name=resnet18", "tune.num_samples=5",
                                 "base.train.workers=1"])
    assert overrides["optim.lr"] == 3e-4 and isinstance(overrides["optim.lr"], float)
    exp = load_experiment(experiment_file, overrides)
    assert exp.base.optim.lr == 3e-4
    assert exp.base.train.epochs == 7
    assert exp.base.data.balanced_sampling is True
    assert exp.base.model.name == "resnet18"
    assert exp.tune.num_samples == 5
    assert exp.base.train.workers == 1


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="optim.lr.*key=value"):
        parse_overrides(["optim.lr"])


@pytest.mark.parametrize("key", ["optim.lrr", "trian.epochs", "data.path.deeper"])
def test_unknown_override_key_is_named(experiment_file, key):
    with pytest.raises(ConfigError, match=f"{key}: unknown key"):
        load_experiment(experiment_file, {key: 1})


def test_unknown_key_in_file_is_named(tmp_path):
    path = write(tmp_path, {"base": {"optim": {"lr": 0.1, "momentun": 0.9}}})
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert "base.optim.momentun: unknown key" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "key, value",
    [("train.epochs", "many"), ("optim.lr", "fast"), ("data.image_size", 8),
     ("loss.name", "hinge"), ("train.epochs", 2.5)],
)
def test_wrong_value_type_names_the_key(experiment_file, key, value):
    with pytest.raises(ConfigError) as info:
        load_experiment(experiment_file, {key: value})
    message = str(info.value)
    assert f"base.{key}:" in message
    assert "\n" not in message  # one line: the CLI prints it as is


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_experiment(tmp_path / "absent.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_experiment(bad)


@pytest.mark.parametrize(
    "dist, message",
    [
        ({"type": "normal", "low": 0, "high": 1}, "type"),
        ({"type": "float", "low": 2.0, "high": 1.0}, "low (2.0) must be <= high (1.0)"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log scale needs low > 0"),
        ({"type": "float", "low": -1.0, "high": 1.0, "log": True}, "log scale needs low > 0"),
        ({"type": "float", "low": 1.0}, "needs both 'low' and 'high'"),
        ({"type": "categorical", "choices": []}, "non-empty 'choices'"),
        ({"type": "int", "low": 1.5, "high": 4}, "whole-number"),
    ],
)
def test_bad_search_distribution_names_the_key(tmp_path, dist, message):
    path = write(tmp_path, {"search": {"optim.lr": dist}})
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert "search.optim.lr" in str(info.value)
    assert message in str(info.value)


def test_search_key_must_exist_in_base(tmp_path):
    path = write(tmp_path, {"search": {"optim.learning_rate": {"type": "float", "low": 0.1,
                                                               "high": 1.0}}})
    with pytest.raises(ConfigError, match="search key 'optim.learning_rate' is not a key of base"):
        load_experiment(path)


STARTING_SEARCH = {
    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "train.batch_size": {"type": "int", "low": 16, "high": 64},
    "loss.name": {"type": "categorical", "choices": ["bce", "focal"]},
}


def test_points_to_evaluate_must_lie_inside_the_search(tmp_path):
    good = {"optim.lr": 1e-3, "train.batch_size": 32, "loss.name": "focal"}
    path = write(tmp_path, {"search": STARTING_SEARCH, "tune": {"points_to_evaluate": [good]}})
    assert load_experiment(path).tune.points_to_evaluate == [good]

    for point, message in [
        ({**good, "optim.lr": 0.5}, "optim.lr=0.5 is outside search.optim.lr"),
        ({**good, "train.batch_size": 32.5}, "train.batch_size=32.5 is outside"),
        ({**good, "loss.name": "dice"}, "loss.name='dice' is outside search.loss.name"),
        ({"optim.lr": 1e-3}, "missing ['loss.name', 'train.batch_size']"),
        ({**good, "optim.momentum": 0.9}, "not searched ['optim.momentum']"),
    ]:
        path = write(tmp_path, {"search": STARTING_SEARCH,
                                "tune": {"points_to_evaluate": [good, point]}})
        with pytest.raises(ConfigError, match=r"tune\.points_to_evaluate\[1\]") as info:
            load_experiment(path)
        assert message in str(info.value)


def test_search_converts_one_to_one_to_optuna(experiment_file):
    dists = sampled_distributions(load_experiment(experiment_file))
    lr = dists["optim.lr"]
    assert isinstance(lr, optuna.distributions.FloatDistribution)
    assert (lr.low, lr.high, lr.log) == (1e-4, 1e-2, True)


def test_with_params_validates_trial_values():
    base = RunConfig()
    assert with_params(base, {"optim.lr": 0.05, "loss.name": "focal"}).loss.name == "focal"
    assert base.loss.name == "bce"  # the base is not modified
    with pytest.raises(ConfigError, match="loss.name"):
        with_params(base, {"loss.name": "hinge"})


def test_resolved_config_roundtrip(tmp_path, experiment_file):
    exp = load_experiment(experiment_file, {"train.epochs": 3, "loss.class_weighting": "explicit",
                                            "train.grad_clip": None})
    saved = save_resolved(exp.base, tmp_path / "out" / "config.yaml")
    tree = yaml.safe_load(saved.read_text())
    assert tree["train"]["epochs"] == 3  # a plain YAML a reader can open
    again = run_config_from_dict(tree, source=str(saved))
    assert again == exp.base


def test_conditional_search_never_samples_an_inert_parameter():
    """sdnet_classifier.yaml: focal's alpha / gamma only under focal, pos_weight only with
    `explicit`, class weighting only without balanced sampling (one imbalance correction)."""
    from crackray.tune.space import ConditionalSpace

    exp = load_experiment(REPO / "search_spaces" / "sdnet_classifier.yaml")
    space = ConditionalSpace(exp.search, exp.base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(200):
        trial = study.ask()
        space(trial)
        seen.append(trial.params)
        study.tell(trial, 0.0)
    for params in seen:
        focal = params["loss.name"] == "focal"
        assert ("loss.focal_alpha" in params) == focal and ("loss.focal_gamma" in params) == focal
        assert ("loss.class_weighting" in params) == (not params["data.balanced_sampling"])
        explicit = params.get("loss.class_weighting") == "explicit"
        assert ("loss.pos_weight" in params) == explicit
        with_params(exp.base, params)  # every sampled combination is a valid config
    # ...and every branch was reached.
    assert {p["loss.name"] for p in seen} == {"bce", "focal"}
    assert any("loss.pos_weight" in p for p in seen) and any(
        p["data.balanced_sampling"] for p in seen)


def test_a_condition_must_name_an_earlier_or_base_key():
    search = {"loss.focal_alpha": {"type": "float", "low": 0.1, "high": 0.9,
                                   "when": {"loss.name": "focal"}},
              "loss.name": {"type": "categorical", "choices": ["bce", "focal"]}}
    with pytest.raises(ValueError, match="must be searched before"):
        ExperimentFile.model_validate({"search": search})
    with pytest.raises(ValueError, match="not a key of base or search"):
        ExperimentFile.model_validate({"search": {"optim.lr": {
            "type": "float", "low": 1e-4, "high": 1e-2, "when": {"loss.nope": 1}}}})

def test_search_overrides_replace_or_drop_a_searched_entry():
    from crackray.config import load_experiment, parse_overrides

    path = Path(__file__).resolve().parents[1] / "search_spaces" / "sdnet_classifier.yaml"
    experiment = load_experiment(path, parse_overrides([
        "search.model.name={type: categorical, choices: [simple_cnn]}",
        "search.optim.weight_decay=null",
    ]))
    assert experiment.search["model.name"].choices == ["simple_cnn"]
    assert "optim.weight_decay" not in experiment.search
    assert "optim.lr" in experiment.search  # the others stay
