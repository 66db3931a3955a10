"""An experiment file: the base run config, the searched parameters in Optuna's vocabulary
(with `when:` conditions), and the tuning settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from crackray.config.dotted import get_dotted
from crackray.config.run import RunConfig, _Strict


class Distribution(_Strict):
    """One searched parameter in Optuna's own vocabulary."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    # Conditional parameter: searched only while every named key (an earlier searched key or
    # a base key) has one of the listed values, e.g. {loss.name: [focal]}; otherwise the base
    # value stays and no trial is spent varying an inert parameter.
    when: dict[str, list[Any]] = {}

    @field_validator("when", mode="before")
    @classmethod
    def _listed(cls, when: Any) -> Any:
        if isinstance(when, dict):
            return {k: v if isinstance(v, list) else [v] for k, v in when.items()}
        return when

    @model_validator(mode="after")
    def _check(self) -> Distribution:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("categorical takes only 'choices'")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high/log/step, not 'choices'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("'log' and 'step' cannot be combined (Optuna forbids it)")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int needs whole-number low and high")
        return self

    def allows(self, value: Any) -> bool:
        """Can this distribution produce `value`? (for hand-picked starting points)"""
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.type == "int" and value != int(value):
            return False
        return self.low <= value <= self.high


class SchedulerConfig(_Strict):
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs every trial gets before it may be stopped
    reduction_factor: float = Field(2.0, gt=1.0)


class TuneConfig(_Strict):
    # The tuning objective is the runs' own `val/objective` (train.objective), maximised: one
    # definition for checkpoints, early stopping, ASHA, TPE and ranking. Kept as keys so that
    # a file naming another metric gets a clear error instead of a silent disagreement.
    metric: Literal["val/objective"] = "val/objective"
    mode: Literal["max"] = "max"
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    scheduler: SchedulerConfig = SchedulerConfig()
    workers_per_trial: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    time_budget_s: float | None = Field(None, gt=0.0)
    seed: int = 0
    # Configurations tried first, before the sampler's own picks (e.g. a paper's defaults or
    # the last job's best); each names a value for every searched key.
    points_to_evaluate: list[dict[str, Any]] = []
    max_failures: int = Field(0, ge=0)  # retries of a trial that raised
    name: str | None = None  # fixed job name (needed to resume); None: the file's stem
    storage_path: str = "ray_results"  # local folder, shared filesystem or object-store URI


class ExperimentFile(_Strict):
    base: RunConfig = RunConfig()
    search: dict[str, Distribution] = {}
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _search_keys_exist(self) -> ExperimentFile:
        for key in self.search:
            try:
                get_dotted(self.base.model_dump(), key)
            except KeyError:
                raise ValueError(f"search key '{key}' is not a key of base") from None
        base = self.base.model_dump()
        earlier: set[str] = set()
        for key, dist in self.search.items():
            for condition in dist.when:
                if condition in self.search and condition not in earlier:
                    raise ValueError(f"search.{key}.when: '{condition}' must be searched "
                                     f"before '{key}' (conditions read earlier entries)")
                if condition not in self.search:
                    try:
                        get_dotted(base, condition)
                    except KeyError:
                        raise ValueError(f"search.{key}.when: '{condition}' is not a key of "
                                         "base or search") from None
            earlier.add(key)
        for index, point in enumerate(self.tune.points_to_evaluate):
            where = f"tune.points_to_evaluate[{index}]"
            active = active_keys(self.search, base, point)
            if set(point) != set(active):
                missing, extra = set(active) - set(point), set(point) - set(active)
                raise ValueError(
                    f"{where} must name every searched key active for its values and no other"
                    + (f"; missing {sorted(missing)}" if missing else "")
                    + (f"; not searched {sorted(extra)}" if extra else "")
                )
            for key, value in point.items():
                if not self.search[key].allows(value):
                    raise ValueError(f"{where}: {key}={value!r} is outside search.{key}")
        return self


def active_keys(search: dict[str, Distribution], base: dict, values: dict[str, Any]) -> list[str]:
    """The searched keys a trial samples, in file order, given the values sampled so far
    (`values`) and the base config's for unsearched condition keys."""
    active: list[str] = []
    for key, dist in search.items():
        def current(name: str) -> Any:
            return values.get(name) if name in search else get_dotted(base, name)

        if all((c not in search or c in active) and current(c) in allowed
               for c, allowed in dist.when.items()):
            active.append(key)
    return active
