"""`Tracker`: a failure-tolerant `MlflowClient` bound to one tracking URI. This file holds
its set-up (experiments, runs found again by key) and its buffered writes; `lineage.py`
(datasets, source, logged models) and `registry.py` (reads, models, the registry) add the
rest."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crackray.scratch import scratch_folder
from crackray.tracking.lineage import LineageMixin
from crackray.tracking.registry import RegistryMixin
from crackray.tracking.store import (
    EXPERIMENT_KIND_TAG,
    KEY_TAG,
    KIND_TAG,
    PARENT_TAG,
    TRAINING_KIND,
    TrackingError,
    local_artifact_root,
    redact,
    rejected,
    resolve_tracking_uri,
    safe_params,
    spool,
)

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


class Tracker(LineageMixin, RegistryMixin):
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
        self._best_models: dict[str, str] = {}  # run id -> its best checkpoint's logged model

    # -- set-up (driver side; errors here are fatal and clear) ---------------------------

    def check_reachable(self) -> None:
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use this store"
            raise TrackingError(
                f"MLflow tracking store {redact(self.uri)} is unreachable: {type(exc).__name__}"
            ) from None

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created if absent; either way marked as a model-training
        project, so the MLflow UI shows its runs rather than a GenAI dashboard (a kind the
        user set is kept)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(
                name,
                artifact_location=local_artifact_root(self.uri),
                tags={EXPERIMENT_KIND_TAG: TRAINING_KIND},
            )
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            self.client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND
            )
        return experiment.experiment_id

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

    @property
    def pending_writes(self) -> int:
        """Writes buffered while the server is away, not yet sent."""
        return len(self._pending)

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
                if rejected(exc):
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
        logging an epoch twice, so it waits for a server that is away (`_patient_read`)."""
        history = self._patient_read(self.client.get_metric_history, run_id, key)
        return {m.step for m in history}

    def run_tags(self, run_id: str) -> dict[str, str]:
        """The run's tags as MLflow has them now, waiting for a server that is away."""
        return self._patient_read(self.client.get_run, run_id).data.tags

    def _patient_read(self, read: Callable, *args):
        """`read(*args)`, retried for up to READ_PATIENCE_S while the server is unreachable;
        an answer from the server (e.g. "no such run") raises at once."""
        deadline = time.monotonic() + READ_PATIENCE_S
        while True:
            try:
                return read(*args)
            except Exception as exc:  # noqa: BLE001 - outage: wait; a real answer: raise
                if rejected(exc) or time.monotonic() >= deadline:
                    raise
                warnings.warn(
                    f"MLflow at {redact(self.uri)} unreachable "
                    f"({type(exc).__name__}); waiting to read run {args[0]}",
                    stacklevel=3,
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
                if rejected(exc):
                    raise
        copy = spool(path)

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
        target = scratch_folder("download-")
        return Path(self.client.download_artifacts(run_id, artifact_path, str(target)))

