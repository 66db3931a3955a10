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
import math
import os
import re
import shutil
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
# MLflow's HTTP client retries a dead server with exponential backoff for minutes (7 retries,
# factor 2) before it raises, which would stall a training epoch: crackray buffers and
# retries writes itself, so each request fails fast. Values a user sets in the environment win.
_FAST_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
READ_PATIENCE_S = 600.0  # how long a worker's read waits for a tracking server to come back
RETRY_EVERY_S = 10.0  # while writes are buffered, how often a new write retries the backlog


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


def _rejected(exc: Exception) -> bool:
    """True when the tracking server answered with an error (a permanent one, such as a
    changed param value), False for an outage (refused connection, timeout, 5xx)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.get_http_status_code() < 500


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

        for name, value in _FAST_HTTP.items():
            os.environ.setdefault(name, value)
        self.uri = resolve_tracking_uri(uri)
        if redact(self.uri) != self.uri:
            # MLflow prints "View run <uri>/#/..." on run end: not with a password in it.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # The registry lives in the same store; without it MLflow uses a process-wide default.
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.buffer_on_error = buffer_on_error
        self._pending: list[tuple[Callable, tuple, dict]] = []
        self._warned = False
        self._failed_at = -math.inf

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
        return self._newest([self.experiment_id(experiment)], query)

    def _newest(self, experiment_ids: list[str], query: str):
        runs = self.client.search_runs(
            experiment_ids,
            filter_string=query,
            order_by=["attributes.start_time DESC"],
            max_results=1,
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
        run = self.client.create_run(
            self.experiment_id(experiment), run_name=run_name, tags=all_tags
        )
        return run.info.run_id

    # -- writes (buffered when the server is away) ---------------------------------------

    def _call(self, fn: Callable, *args, **kwargs) -> None:
        self._pending.append((fn, args, kwargs))
        # During an outage each attempt costs MLflow's retries: queue without trying for a while.
        if len(self._pending) == 1 or time.monotonic() - self._failed_at >= RETRY_EVERY_S:
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
                self._failed_at = time.monotonic()
                if _rejected(exc):
                    # The server answered "no" (e.g. a bad value): retrying cannot help, and
                    # keeping the write would block every write queued behind it.
                    warnings.warn(f"MLflow rejected a tracking write, dropped: {exc}", stacklevel=2)
                    self._pending.pop(0)
                    continue
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
            warnings.warn(
                f"MLflow at {redact(self.uri)} is back; buffered writes sent", stacklevel=2
            )
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
        """Steps of `key` already in MLflow. A restarted worker needs the answer to avoid
        logging an epoch twice, so it waits (up to READ_PATIENCE_S) for a server that is away."""
        deadline = time.monotonic() + READ_PATIENCE_S
        while True:
            try:
                return {m.step for m in self.client.get_metric_history(run_id, key)}
            except Exception as exc:  # noqa: BLE001 - outage: wait; a real answer: raise
                if _rejected(exc) or time.monotonic() >= deadline:
                    raise
                warnings.warn(
                    f"MLflow at {redact(self.uri)} unreachable "
                    f"({type(exc).__name__}); waiting to read {key}",
                    stacklevel=2,
                )
                time.sleep(2.0)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call(self.client.set_tag, run_id, key, redact(str(value)))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        if not self._pending:
            try:
                self.client.log_artifact(run_id, str(path), artifact_path)
                return
            except Exception as exc:  # noqa: BLE001 - buffered below; the rejection case too
                if _rejected(exc):
                    raise
        # Buffered: the caller may delete `path` (a checkpoint in a temporary folder) before
        # the server is back, so the queue keeps its own copy.
        copy = Path(tempfile.mkdtemp(prefix="crackray-spool-")) / Path(path).name
        shutil.copy2(path, copy)

        def send() -> None:
            self.client.log_artifact(run_id, str(copy), artifact_path)
            shutil.rmtree(copy.parent, ignore_errors=True)

        self._call(send)

    def log_json(self, run_id: str, data: Any, artifact_file: str) -> None:
        self._call(
            self.client.log_text, run_id, json.dumps(data, indent=2, default=str), artifact_file
        )

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._call(self.client.log_text, run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self._call(self.client.log_figure, run_id, figure, artifact_file)

    def log_artifacts(self, run_id: str, artifacts: dict[str, Any]) -> None:
        """Log artifact objects by file name: dicts as JSON, strings as text, matplotlib
        figures as images (closed once logged)."""
        for artifact_file, obj in artifacts.items():
            if isinstance(obj, dict):
                self.log_json(run_id, obj, artifact_file)
            elif isinstance(obj, str):
                self.log_text(run_id, obj, artifact_file)
            else:
                self.log_figure(run_id, obj, artifact_file)
                import matplotlib.pyplot as plt

                plt.close(obj)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call(self.client.set_terminated, run_id, status)

    def download(self, run_id: str, artifact_path: str) -> Path:
        target = tempfile.mkdtemp(prefix="crackray-")
        return Path(self.client.download_artifacts(run_id, artifact_path, target))

    # -- runs, models and the registry (select / predict / report / ui) ------------------

    def get_run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException for an unknown or malformed id
            raise TrackingError(f"no MLflow run {run_id!r} in {redact(self.uri)}") from None

    def latest_run_anywhere(self, kind: str, experiment: str | None = None):
        """The most recent run of `kind` in `experiment` (by name), or in any experiment."""
        if experiment is not None:
            if self.client.get_experiment_by_name(experiment) is None:
                raise TrackingError(
                    f"no MLflow experiment named {experiment!r} in {redact(self.uri)}"
                )
            return self.latest_run(experiment, kind=kind)
        ids = [e.experiment_id for e in self.client.search_experiments()]
        return self._newest(ids, f"tags.`{KIND_TAG}` = '{kind}'") if ids else None

    def child_runs(self, parent_run_id: str, kind: str | None = None) -> list:
        """Every run whose `mlflow.parentRunId` is `parent_run_id` (optionally of one kind),
        oldest first."""
        parent = self.get_run(parent_run_id)
        query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
        if kind:
            query += f" and tags.`{KIND_TAG}` = '{kind}'"
        return list(
            reversed(
                self.client.search_runs(
                    [parent.info.experiment_id],
                    filter_string=query,
                    order_by=["attributes.start_time DESC"],
                    max_results=10000,
                )
            )
        )

    def metric_history(self, run_id: str, key: str) -> dict[int, float]:
        return {m.step: m.value for m in self.client.get_metric_history(run_id, key)}

    def log_pytorch_model(
        self,
        run_id: str,
        model,
        *,
        input_example,
        output_example,
        metadata: dict,
        extra_files: list[str],
    ) -> str:
        """`mlflow.pytorch.log_model` into `run_id` with an explicit signature; returns the
        model URI. `input_example` must hold >= 2 samples, or the saved signature pins the
        batch size to 1."""
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=input_example,
                signature=infer_signature(input_example, output_example),
                metadata=metadata,
                extra_files=extra_files,
            )
        return info.model_uri

    def register(self, model_uri: str, name: str, alias: str, tags: dict | None = None) -> str:
        """Register `model_uri` as a new version of `name` and point `alias` at it (aliases,
        never the deprecated stages); returns the version."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        version = mlflow.register_model(model_uri, name, tags=tags)
        self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def model_version(self, name: str, alias_or_version: str):
        """The registered version behind `name@alias` (or `name/version`)."""
        from mlflow.exceptions import MlflowException

        try:
            registered = self.client.get_registered_model(name)
        except MlflowException:
            raise TrackingError(f"no registered model {name!r} in {redact(self.uri)}") from None
        try:
            if alias_or_version.isdigit():
                return self.client.get_model_version(name, alias_or_version)
            return self.client.get_model_version_by_alias(name, alias_or_version)
        except MlflowException:
            known = ", ".join(sorted(registered.aliases)) or "none"
            raise TrackingError(
                f"registered model {name!r} has no alias or version "
                f"{alias_or_version!r} (aliases: {known})"
            ) from None

    def download_uri(self, artifact_uri: str) -> Path:
        """Download any artifact URI (runs:/..., models:/..., file paths) to a temp folder."""
        import mlflow.artifacts

        target = tempfile.mkdtemp(prefix="crackray-")
        try:
            return Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=target, tracking_uri=self.uri
                )
            )
        except Exception as exc:  # noqa: BLE001 - MlflowException / OSError alike
            raise TrackingError(f"cannot download {artifact_uri}: {exc}") from None


def server_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow server` over a local store, with artifacts where crackray writes them."""
    import sys

    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    root = _local_artifact_root(uri)
    if root:
        # Experiments created in the UI get the same artifact folder as crackray's own.
        command += ["--default-artifact-root", root, "--no-serve-artifacts"]
    return command
