"""Typed configuration: one experiment file = fixed `base` run config + `search` + `tune`.

Precedence follows timm: defaults here, then the YAML file, then `--set key=value`
overrides; the resolved config is saved next to the outputs. Every model forbids unknown
keys, so a typo is an error that names the key instead of a silently ignored setting.
`run.py` holds the run sections, `experiment.py` the search and tuning settings,
`loading.py` files and overrides.
"""

from crackray.config.dotted import flatten, get_dotted, set_dotted
from crackray.config.experiment import (
    Distribution,
    ExperimentFile,
    SchedulerConfig,
    TuneConfig,
    active_keys,
)
from crackray.config.loading import (
    load_experiment,
    parse_overrides,
    run_config_from_dict,
    save_resolved,
    with_params,
)
from crackray.config.run import (
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig", "Distribution", "ExperimentFile", "LossConfig", "ModelConfig",
    "OptimConfig", "RunConfig", "SchedulerConfig", "TrackingConfig", "TrainConfig",
    "TuneConfig", "active_keys", "flatten", "get_dotted", "load_experiment",
    "parse_overrides", "run_config_from_dict", "save_resolved", "set_dotted", "with_params",
]
