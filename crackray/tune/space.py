"""Search-space entries (Optuna's own vocabulary in the YAML) -> Optuna distributions, and a
check that every value they can produce makes a valid run config."""

from __future__ import annotations

import optuna

from crackray.config import Distribution, ExperimentFile, with_params
from crackray.errors import ConfigError


def to_optuna(search: dict[str, Distribution]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Search-space entries -> Optuna distributions, one to one."""
    out = {}
    for key, dist in search.items():
        if dist.type == "categorical":
            out[key] = optuna.distributions.CategoricalDistribution(dist.choices)
        elif dist.type == "int":
            out[key] = optuna.distributions.IntDistribution(
                int(dist.low), int(dist.high), log=dist.log, step=int(dist.step or 1)
            )
        else:
            out[key] = optuna.distributions.FloatDistribution(
                dist.low, dist.high, log=dist.log, step=dist.step
            )
    return out


def check_search_values(experiment: ExperimentFile) -> None:
    """Every value a distribution can produce must validate in the base config (e.g. a model
    name in `choices` that does not exist), checked before Ray starts."""
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
