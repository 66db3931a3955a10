"""Search-space entries (Optuna's own vocabulary in the YAML) -> an Optuna define-by-run
space that honours `when:` conditions, and a check that every value they can produce makes a
valid run config."""

from __future__ import annotations

import optuna

from crackray.config import Distribution, ExperimentFile, RunConfig, active_keys, with_params
from crackray.errors import ConfigError


class ConditionalSpace:
    """Optuna define-by-run space for OptunaSearch: each trial samples the entries whose
    `when` conditions hold for what it sampled before them, so TPE never spends a trial on a
    parameter that has no effect (focal's alpha under BCE, pos_weight without `explicit`).
    A class, not a closure: Tune pickles the searcher with the job's state."""

    def __init__(self, search: dict[str, Distribution], base: RunConfig):
        self.search, self.base_tree = search, base.model_dump()

    def __call__(self, trial: optuna.Trial) -> None:
        sampled: dict = {}
        for key, dist in self.search.items():
            if key in active_keys(self.search, self.base_tree, sampled):
                sampled[key] = _suggest(trial, key, dist)


def _suggest(trial: optuna.Trial, key: str, dist: Distribution):
    if dist.type == "categorical":
        return trial.suggest_categorical(key, dist.choices)
    if dist.type == "int":
        return trial.suggest_int(key, int(dist.low), int(dist.high), log=dist.log,
                                 step=int(dist.step or 1))
    return trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)


# Keys that define what the trials are compared by: searching them would rank trials by
# different objectives.
OBJECTIVE_KEYS = ("train.objective", "train.objective_min_precision", "train.best_model",
                  "train.pixel_protocol")


def check_search_values(experiment: ExperimentFile) -> None:
    """Every value a distribution can produce must validate in the base config (e.g. a model
    name in `choices` that does not exist), checked before Ray starts."""
    for key in OBJECTIVE_KEYS:
        if key in experiment.search:
            raise ConfigError(f"search.{key}: defines the objective trials are compared by; "
                              f"set it in base, not in search")
    for key, dist in experiment.search.items():
        probes = dist.choices if dist.type == "categorical" else [dist.low, dist.high]
        for value in probes:
            if dist.type == "int":
                value = int(value)
            try:
                with_params(experiment.base, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"search.{key}: value {value!r} is invalid: {exc}") from None
        if key == "model.name":
            from crackray.models import list_models

            unknown = [c for c in dist.choices or [] if c not in list_models()]
            if unknown:
                raise ConfigError(
                    f"search.model.name: unknown models {unknown}. "
                    f"Supported: {', '.join(list_models())}"
                )
