"""Typed configuration: one experiment file = fixed `base` run config + `search` + `tune`.

Precedence follows timm: defaults here, then the YAML file, then `--set key=value`
overrides; the resolved config is saved next to the outputs. Every model forbids unknown
keys, so a typo is an error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crackray.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    path: str = "data/demo"  # folder of Parquet shards written by `crackray prepare`
    # Make synthetic demo tiles at `path` when it is absent (the quickstart's embedded default).
    synthetic_if_missing: bool = False
    synthetic_n: int = Field(400, ge=8)
    image_size: int = Field(224, ge=16, le=1024)
    augment: float = Field(1.0, ge=0.0, le=1.0)  # 0 = none; 1 = flips, rot90, full colour jitter
    balanced_sampling: bool = False  # oversample cracks to ~50 % of each training epoch
    # Segmentation (segdec) data options.
    segmented_fraction: float = Field(1.0, ge=0.0, le=1.0)  # positives that keep their mask
    dilate: int = Field(1, ge=1)  # k x k dilation of ground-truth masks; 1 = none
    use_negatives: bool = True
    frequency_sampling: bool = False  # draw negatives by how rarely they were used

    @field_validator("dilate")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd (a centred k x k kernel)")
        return v


class ModelConfig(_Strict):
    name: str = "simple_cnn"
    # ImageNet weights. torchvision models download them once (internet needed on first use);
    # efficientnet_lite0's ship in a package, so it works offline.
    pretrained: bool = False
    # A local weights file instead of `pretrained`: the backbone's ImageNet state dict in its
    # library's layout (head replaced), or a crackray model file / state dict (head kept).
    weights: str | None = None
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # BatchNorm keeps its pretrained running statistics during training (eval mode), so
    # small or one-class batches cannot skew them; its scale and shift still learn.
    freeze_bn: bool = False

    @model_validator(mode="after")
    def _weights_source(self) -> ModelConfig:
        if self.pretrained and self.weights is not None:
            raise ValueError("model.weights replaces model.pretrained: set pretrained to false")
        if self.freeze_bn and not (self.pretrained or self.weights is not None):
            raise ValueError(
                "model.freeze_bn keeps pretrained BatchNorm statistics: it needs "
                "model.pretrained or model.weights"
            )
        return self


class LossConfig(_Strict):
    name: Literal["bce", "focal"] = "bce"
    # none: every sample weighs 1; inverse_frequency: pos_weight = negatives / positives of the
    # training split; explicit: use `pos_weight` below.
    class_weighting: Literal["none", "inverse_frequency", "explicit"] = "none"
    pos_weight: float = Field(1.0, gt=0.0)
    focal_alpha: float = Field(0.25, ge=0.0, le=1.0)
    focal_gamma: float = Field(2.0, ge=0.0)
    # segdec: total = seg_weight * seg_loss + delta_cls * dec_weight * dec_loss
    delta_cls: float = Field(1.0, ge=0.0)
    dynamic_balance: bool = False
    weighted_seg: bool = False
    weighted_seg_p: float = Field(2.0, gt=0.0)
    weighted_seg_max: float = Field(3.0, gt=0.0)


class OptimConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scheduler: Literal["none", "cosine", "plateau", "onecycle"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    # Fine-tuning: the backbone learns at lr * backbone_lr_scale and the new crack head at lr,
    # so large early steps of a random head do not wash out pretrained features.
    backbone_lr_scale: float = Field(1.0, gt=0.0)
    # Head-only warm-up: the backbone's learning rate is 0 for the first N epochs.
    freeze_backbone_epochs: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _freeze_needs_a_step_schedule(self) -> OptimConfig:
        if self.freeze_backbone_epochs and self.scheduler not in ("cosine", "none"):
            raise ValueError(
                f"optim.freeze_backbone_epochs works with optim.scheduler cosine or none, "
                f"not {self.scheduler}"
            )
        return self


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0.0)
    # torch threads of each worker on CPU. None: one per CPU the worker reserves (Ray's
    # default). More (up to the cores) lets a compute-bound model use the CPUs kept for
    # ingest while decode tasks sleep; they still get their turn by time-slicing.
    threads_per_worker: int | None = Field(None, ge=1)
    # Ray Train's placement group: PACK fills a node first (fast collectives); SPREAD puts the
    # workers on different nodes where it can (spreads memory, survives one node's loss).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    batch_size: int = Field(32, ge=1)  # per worker
    eval_batch_size: int = Field(64, ge=1)
    seed: int = 0
    grad_clip: float | None = Field(1.0, gt=0.0)
    bf16: bool = True  # autocast to bfloat16 on GPU; ignored on CPU
    early_stopping_patience: int = Field(5, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the latest checkpoint
    gradient_adjustment: bool = False  # segdec: no decision-loss gradient into the seg subnet
    # What "better" means, one threshold-free validation score for the best checkpoint, early
    # stopping, the plateau scheduler, ASHA, TPE, tune's ranking and report's trials table
    # (logged every epoch as val/objective; see scores.py). F1 at a fixed 0.5 would punish a
    # trial whose loss or sampling moved the calibration, which select re-thresholds anyway.
    objective: Literal["ap", "f1_best", "recall_at_precision"] = "ap"
    objective_min_precision: float = Field(0.5, gt=0.0, le=1.0)  # recall_at_precision's floor
    # segdec: which validation score picks the best checkpoint: the decision objective above,
    # the pixel F1 of `pixel_protocol`, or their mean.
    best_model: Literal["seg", "dec", "both"] = "dec"
    # segdec pixel metric that `best_model: seg|both` and select's mask threshold use:
    # "symmetric" (2-px tolerance both ways, pooled) or "segdec" (the SegDec papers' protocol).
    pixel_protocol: Literal["symmetric", "segdec"] = "symmetric"
    log_masks_every: int = Field(5, ge=1)  # segdec: epochs between predicted-mask artifacts


class TrackingConfig(_Strict):
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (the embedded default).
    uri: str | None = None
    experiment: str | None = None  # None: the experiment file's stem


class RunConfig(_Strict):
    """Everything one training run needs; `crackray train` uses it alone."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()


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


# ---------------------------------------------------------------------------------------------
# Loading, overrides and flattening


def get_dotted(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: '{part}' is a value, not a section")
    node[parts[-1]] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key=value` strings to a dict; values are parsed as YAML scalars (3e-4, true, [a, b])."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' must look like key=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse value '{raw}': {exc}") from None
        # YAML 1.1 reads 3e-4 (no dot) as a string; people write learning rates that way.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)
        out[key.strip()] = value
    return out


def _format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: " + "; ".join(parts)


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentFile:
    """Read an experiment YAML, apply dotted overrides, validate; errors name file and key.

    Overrides may name `base.`, `search.` or `tune.` keys; a key without one of these prefixes
    is taken as a `base.` key, so `--set optim.lr=3e-4` works for `train` and `tune` alike.
    `--set "search.optim.lr={type: float, low: 1e-4, high: 1e-2}"` replaces a searched entry
    and `--set search.optim.lr=null` removes it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such experiment file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping with base / search / tune")
    for key, value in (overrides or {}).items():
        if key.split(".")[0] not in ("base", "search", "tune"):
            key = f"base.{key}"
        if key.startswith("search."):
            # Searched names are dotted themselves: `search.optim.lr` is the entry "optim.lr";
            # null drops it from the search (the base value is then used).
            search = raw.setdefault("search", {}) or {}
            raw["search"] = search
            if value is None:
                search.pop(key.removeprefix("search."), None)
            else:
                search[key.removeprefix("search.")] = value
            continue
        _check_override_key(raw, key)
        set_dotted(raw, key, value)
    try:
        experiment = ExperimentFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path))) from None
    if experiment.tune.name is None:
        experiment.tune.name = path.stem
    if experiment.base.tracking.experiment is None:
        experiment.base.tracking.experiment = path.stem
    return experiment


def _check_override_key(raw: dict, key: str) -> None:
    """Reject an override of a key that no model defines (before pydantic sees a typo)."""
    defaults = ExperimentFile().model_dump()
    if key.startswith("search."):
        return
    try:
        get_dotted(defaults, key)
    except KeyError:
        raise ConfigError(f"--set {key}: unknown key") from None


def run_config_from_dict(tree: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def with_params(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """A copy of `base` with dotted params (a tuning trial's sample) applied and validated."""
    tree = base.model_dump()
    for key, value in params.items():
        set_dotted(tree, key, value)
    return run_config_from_dict(tree, source="trial params")


def save_resolved(config: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    return path
