"""The only module that talks to MLflow.

Design against the known traps:
- one run per training / trial: runs are created by the driver (never by Train workers) and
  found again by a `crackray.key` tag, so a restart or resume reuses its run instead of
  making a second one;
- parameters are logged once: already-logged keys are skipped, so a resumed run never hits
  "changing param values is not allowed";
- the tracking URI is made absolute before it reaches workers (a relative sqlite path would
  create one `mlflow.db` per Ray worker directory), and experiments on a local store get an
  absolute artifact location for the same reason;
- a tracking server that drops out mid-run does not fail training: writes are buffered and
  retried, with a warning, and flushed when it comes back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crackray.errors import CrackrayError

KEY_TAG = "crackray.key"
KIND_TAG = "crackray.kind"
PARENT_TAG = "mlflow.parentRunId"
_SECRET_IN_URI = re.compile(r"(://[^/:@]+:)[^@/]+@")
_SECRET_KEYS = re.compile(r"(password|token|secret|api_key|apikey)", re.IGNORECASE)


class TrackingError(CrackrayError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; local paths
    are made absolute so that every Ray worker writes to the same store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        return f"sqlite:///{path if path.is_absolute() else (Path.cwd() / path)}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def redact(text: str) -> str:
    """Hide the password of a URI such as http://user:secret@host."""
    return _SECRET_IN_URI.sub(r"\1***@", text)


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow strings, without secrets (passwords in URIs, token-like keys)."""
    out = {}
    for key, value in params.items():
        if _SECRET_KEYS.search(key):
            continue
        out[key] = redact(str(value))[:6000]
    return out


def _local_artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("crackray", "torch", "torchvision", "ray", "mlflow", "optuna", "torchmetrics"):
        try:
            out[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            out[f"version.{package}"] = "absent"
    return out


class Tracker:
    """A thin, failure-tolerant wrapper around `MlflowClient` bound to one tracking URI."""

    def __init__(self, uri: str | None = None, *, buffer_on_error: bool = True):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.buffer_on_error = buffer_on_error
        self._pending: list[tuple[Callable, tuple, dict]] = []
        self._warned = False

    # -- set-up (driver side; errors here are fatal and clear) ---------------------------

    def check_reachable(self) -> None:
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use this store"
            raise TrackingError(
                f"MLflow tracking store {redact(self.uri)} is unreachable: {type(exc).__name__}"
            ) from None

    def experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(name, artifact_location=_local_artifact_root(self.uri))

    def find_run(self, experiment: str, key: str):
        runs = self.client.search_runs(
            [self.experiment_id(experiment)], filter_string=f"tags.`{KEY_TAG}` = '{key}'"
        )
        return runs[0] if runs else None

    def latest_run(self, experiment: str, *, kind: str, unfinished: bool = False):
        """The most recently started run of `kind` (optionally not FINISHED), or None."""
        query = f"tags.`{KIND_TAG}` = '{kind}'"
        if unfinished:
            query += " and attributes.status != 'FINISHED'"
        runs = self.client.search_runs(
            [self.experiment_id(experiment)], filter_string=query,
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        return runs[0] if runs else None

    def find_or_create_run(
        self,
        experiment: str,
        key: str,
        *,
        run_name: str,
        kind: str,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """The run tagged with `key`, created if absent, and (re)marked RUNNING."""
        existing = self.find_run(experiment, key)
        if existing is not None:
            run_id = existing.info.run_id
            if existing.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        all_tags = {KEY_TAG: key, KIND_TAG: kind, **(tags or {})}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=all_tags)
        return run.info.run_id

    # -- writes (buffered when the server is away) ---------------------------------------

    def _call(self, fn: Callable, *args, **kwargs) -> None:
        self._pending.append((fn, args, kwargs))
        self.flush(raise_errors=not self.buffer_on_error)

    def flush(self, *, raise_errors: bool = False, timeout_s: float = 0.0) -> bool:
        """Send buffered writes in order; True when none is left. Retries until `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self._pending:
            fn, args, kwargs = self._pending[0]
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a tracking outage must not kill training
                if raise_errors:
                    raise
                if not self._warned:
                    warnings.warn(
                        f"MLflow at {redact(self.uri)} failed ({type(exc).__name__}); "
                        "buffering tracking writes and retrying",
                        stacklevel=2,
                    )
                    self._warned = True
                if time.monotonic() >= deadline:
                    return False
                time.sleep(1.0)
                continue
            self._pending.pop(0)
        if self._warned:
            warnings.warn(f"MLflow at {redact(self.uri)} is back; buffered writes sent", stacklevel=2)
            self._warned = False
        return True

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(run_id).data.params
        fresh = [Param(k, v) for k, v in safe_params(params).items() if k not in logged]
        for start in range(0, len(fresh), 100):  # MLflow's batch limit
            self._call(self.client.log_batch, run_id, params=fresh[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), stamp, step or 0)
            for key, value in metrics.items()
            if isinstance(value, int | float) and value == value  # NaN is "not meaningful"
        ]
        if batch:
            self._call(self.client.log_batch, run_id, metrics=batch)

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call(self.client.set_tag, run_id, key, redact(str(value)))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifact, run_id, str(path), artifact_path)

    def log_json(self, run_id: str, data: Any, artifact_file: str) -> None:
        self._call(self.client.log_text, run_id, json.dumps(data, indent=2, default=str), artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._call(self.client.log_text, run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self._call(self.client.log_figure, run_id, figure, artifact_file)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, run_id, status)

    def download(self, run_id: str, artifact_path: str) -> Path:
        target = tempfile.mkdtemp(prefix="crackray-")
        return Path(self.client.download_artifacts(run_id, artifact_path, target))
