"""What the tracking store is and how it is named: URIs made absolute, secrets kept out of
what is logged or printed, the software's identity (git commit, versions), and the UI's
addresses."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from crackray.errors import CrackrayError

KEY_TAG = "crackray.key"  # finds a run again: a restart or resume reuses it
KIND_TAG = "crackray.kind"  # train, tune, trial, select
PARENT_TAG = "mlflow.parentRunId"
_SECRET_IN_URI = re.compile(r"(://[^/:@]+:)[^@/]+@")
_SECRET_KEYS = re.compile(r"(password|token|secret|api_key|apikey)", re.IGNORECASE)
# The MLflow UI opens an experiment in GenAI mode (Traces, Token usage) unless the experiment
# says it is a model-training project, and its Runs table only in the machine-learning mode.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
TRAINING_MODE_QUERY = "workflowType=machine_learning"


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


def rejected(exc: Exception) -> bool:
    """True when the tracking server answered with an error (a permanent one, such as a
    changed param value), False for an outage (refused connection, timeout, 5xx)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.get_http_status_code() < 500


def local_artifact_root(uri: str) -> str | None:
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


def source_name() -> str:
    """What started this process, as MLflow's `mlflow.source.name` (the command line, e.g.
    `crackray tune search_spaces/quickstart.yaml`), with any password in it hidden."""
    return redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))[:500]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("crackray", "torch", "torchvision", "ray", "mlflow", "optuna", "torchmetrics"):
        try:
            out[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            out[f"version.{package}"] = "absent"
    return out


def runs_table_url(ui: str, experiment_id: str | None) -> str:
    """The UI page of an experiment's Runs table in model-training mode (the UI's home when
    there is no experiment yet)."""
    ui = ui.rstrip("/")
    if experiment_id is None:
        return f"{ui}/"
    return f"{ui}/#/experiments/{experiment_id}/runs?{TRAINING_MODE_QUERY}"


def server_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow server` over a local store, with artifacts where crackray writes them."""
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
    root = local_artifact_root(uri)
    if root:
        # Experiments created in the UI get the same artifact folder as crackray's own.
        command += ["--default-artifact-root", root, "--no-serve-artifacts"]
    return command


def spool(path: str | Path) -> Path:
    """A private copy of a file for a buffered write: the caller may delete `path` (a
    checkpoint in a temporary folder) before the server is back."""
    copy = Path(tempfile.mkdtemp(prefix="crackray-spool-")) / Path(path).name
    shutil.copy2(path, copy)
    return copy
