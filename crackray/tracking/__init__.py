"""The only package that talks to MLflow.

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
  retried, with a warning, and flushed when it comes back;
- what the MLflow UI needs to show a training project: the experiment kind tag, dataset
  inputs, source tags and each run's best checkpoint as a logged model.

Modules: `store` (URIs, secrets, identity, UI addresses), `tracker` (`Tracker`: set-up and
buffered writes), `lineage` (datasets, source, logged models), `registry` (reads, models,
registry).
"""

from crackray.tracking.lineage import BEST_MODEL, BEST_MODEL_TAG, DATASET_CONTEXT_TAG
from crackray.tracking.store import (
    EXPERIMENT_KIND_TAG,
    KEY_TAG,
    KIND_TAG,
    PARENT_TAG,
    TRAINING_KIND,
    TrackingError,
    git_commit,
    redact,
    resolve_tracking_uri,
    runs_table_url,
    safe_params,
    server_command,
    source_name,
    versions,
)
from crackray.tracking.tracker import READ_PATIENCE_S, RETRY_EVERY_S, Tracker

__all__ = [
    "BEST_MODEL", "BEST_MODEL_TAG", "DATASET_CONTEXT_TAG", "EXPERIMENT_KIND_TAG", "KEY_TAG",
    "KIND_TAG", "PARENT_TAG", "READ_PATIENCE_S", "RETRY_EVERY_S", "TRAINING_KIND",
    "Tracker", "TrackingError", "git_commit", "redact", "resolve_tracking_uri",
    "runs_table_url", "safe_params", "server_command", "source_name", "versions",
]
