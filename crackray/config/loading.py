"""YAML files -> validated configs: overrides checked against the key and its type, errors
that name the key, the resolved config saved next to the outputs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from crackray.config.dotted import get_dotted, set_dotted
from crackray.config.experiment import ExperimentFile
from crackray.config.run import RunConfig
from crackray.errors import ConfigError

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
