"""Tuning jobs on a Ray cluster through the Ray Jobs API: submit, follow, list, stop.

`crackray submit FILE --address http://HEAD:8265` uploads the working directory (without
data, stores, results and virtualenvs) and crackray's pinned requirements as the job's
runtime environment, so the cluster runs this code at the same versions; the job itself is
`crackray tune FILE` on the head node, which connects to the cluster it runs in.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import uuid
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from crackray.config import ExperimentFile, load_experiment, parse_overrides
from crackray.errors import ConfigError, CrackrayError

# gitignore patterns, relative to each uploaded folder: outputs and environments never travel.
UPLOAD_EXCLUDES = [
    ".git/", ".venv/", "venv/", "__pycache__/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/",
    "mlflow.db", "mlruns/", "mlartifacts/", "ray_results/",
    "*.pt", "*.pth", "*.ckpt", "*.parquet",
]
# The project's data folder. Anchored, so it cannot match the package's own `crackray/data/`;
# only used when the package travels inside the working directory (see runtime_env).
DATA_FOLDER = "/data/"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PACKAGE_DIR = Path(__file__).resolve().parent


def requirements() -> list[str]:
    """crackray's pinned runtime requirements (pyproject's dependencies, without extras).

    Ray itself is left out: the cluster already runs it, and a job must not reinstall it.
    """
    out = []
    for line in metadata.requires("crackray") or []:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        if req.name.lower() != "ray":
            out.append(line)
    return out


def runtime_env(working_dir: Path, deps: bool) -> dict:
    """The job's runtime environment: the working directory, the crackray package (when it
    is installed from elsewhere) and, unless the cluster image provides them, its pins."""
    env: dict = {"working_dir": str(working_dir), "excludes": list(UPLOAD_EXCLUDES)}
    if PACKAGE_DIR.is_relative_to(working_dir):
        env["excludes"].append(DATA_FOLDER)
    else:
        env["py_modules"] = [str(PACKAGE_DIR)]
    if deps:
        env["pip"] = requirements()
    return env


def entrypoint(file: str, overrides: tuple[str, ...], tracking_uri: str | None) -> str:
    """`crackray tune` as a module call: the uploaded package need not be pip-installed."""
    args = ["python", "-m", "crackray.cli", "tune", file]
    for pair in overrides:
        args += ["--set", pair]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    return shlex.join(args)


def cluster_warnings(experiment: ExperimentFile, tracking_uri: str | None) -> list[str]:
    """Paths and stores that work on this machine but not on a cluster's head node."""
    warnings = []
    places = {"data.path": experiment.base.data.path,
              "tune.storage_path": experiment.tune.storage_path}
    for key, value in places.items():
        if "://" not in value and not Path(value).is_absolute():
            warnings.append(
                f"{key} '{value}' is relative: on the cluster it lands in the job's temporary "
                f"working directory; use a shared filesystem path or an object-store URI "
                f"(s3://, gs://) that every node can reach"
            )
    if tracking_uri is None:
        warnings.append(
            "no tracking URI (--tracking-uri, $MLFLOW_TRACKING_URI or tracking.uri): the job "
            "writes to a sqlite store in its temporary working directory on the head node; "
            "start an MLflow server for the cluster (see cluster/README.md)"
        )
    elif tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        warnings.append(
            f"tracking URI {tracking_uri} is a local store: the head node and every worker "
            f"node must mount it at this path"
        )
    return warnings


# ----------------------------------------------------------------------------- the client


def auth_headers() -> dict[str, str]:
    """The bearer token of a Ray 2.59+ cluster with token auth, found where `ray job` finds
    it ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); harmless without auth."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except (ConnectionError, RuntimeError) as exc:
        raise CrackrayError(f"cannot reach the Ray Jobs API at {address}: "
                            f"{str(exc).splitlines()[0]}") from None


def _refused(exc: RuntimeError, what: str) -> CrackrayError:
    return CrackrayError(f"{what}: {str(exc).splitlines()[0]}")


# ----------------------------------------------------------------------------- commands


def submit(file: str, address: str, overrides: tuple[str, ...], tracking_uri: str | None, *,
           working_dir: str = ".", deps: bool = True, wait: bool = True) -> int:
    """Submit `crackray tune FILE` as a Ray job; with `wait`, follow its logs to the end.

    Returns the exit code for the shell: 0 when the job SUCCEEDED (or was only submitted),
    the driver's own exit code when it FAILED.
    """
    experiment = load_experiment(file, parse_overrides(overrides))  # fail here, not there
    root = Path(working_dir).resolve()
    try:
        relative = Path(file).resolve().relative_to(root)
    except ValueError:
        raise ConfigError(f"{file}: the experiment file must lie inside the uploaded working "
                          f"directory {root} (see --working-dir)") from None
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    for warning in cluster_warnings(experiment, tracking_uri or experiment.base.tracking.uri):
        print(f"warning: {warning}", flush=True)

    client = connect(address)
    job_id = f"crackray-{experiment.tune.name}-{time.strftime('%Y%m%d-%H%M%S')}-" \
             f"{uuid.uuid4().hex[:4]}"
    start = time.perf_counter()
    try:
        client.submit_job(
            entrypoint=entrypoint(relative.as_posix(), overrides, tracking_uri),
            submission_id=job_id,
            runtime_env=runtime_env(root, deps),
            metadata={"crackray.file": relative.as_posix(),
                      "crackray.experiment": str(experiment.base.tracking.experiment)},
        )
    except RuntimeError as exc:
        raise _refused(exc, f"the cluster at {address} refused the job") from None
    print(f"submitted job {job_id} to {address}", flush=True)
    if not wait:
        print(f"follow: crackray jobs logs {job_id} --address {address} --follow\n"
              f"stop:   crackray jobs stop {job_id} --address {address}", flush=True)
        return 0
    return follow(client, job_id, address, start)


def follow(client, job_id: str, address: str, start: float | None = None) -> int:
    """Stream the job's logs until it ends; print its final status; return its exit code."""
    start = time.perf_counter() if start is None else start
    try:
        asyncio.run(_stream_logs(client, job_id))
        status = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running. Stop it with: "
              f"crackray jobs stop {job_id} --address {address}", flush=True)
        return 130
    info = client.get_job_info(job_id)
    code = exit_code(status, info.driver_exit_code)
    if status != "SUCCEEDED" and info.message:
        print(info.message, flush=True)
    print(f"job {job_id} {status} (exit code {code}) after "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return code


async def _stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _wait_terminal(client, job_id: str, poll_s: float = 1.0) -> str:
    """The log stream closes as the driver exits; the status follows a moment later."""
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def exit_code(status: str, driver_exit_code: int | None) -> int:
    """A shell exit code that matches the job: 0 only for SUCCEEDED; a driver killed by
    signal N gives 128 + N, as a shell would report it."""
    if status == "SUCCEEDED":
        return 0
    if not driver_exit_code:
        return 1
    return 128 - driver_exit_code if driver_exit_code < 0 else driver_exit_code


def list_jobs(address: str) -> str:
    """A table of the cluster's submitted jobs, oldest first."""
    client = connect(address)
    jobs = [j for j in client.list_jobs() if j.submission_id]
    jobs.sort(key=lambda j: j.start_time or 0)
    rows = [("SUBMISSION ID", "STATUS", "STARTED", "DURATION", "ENTRYPOINT")]
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
        end = job.end_time or time.time() * 1000
        duration = f"{(end - (job.start_time or end)) / 1000:.0f} s"
        rows.append((job.submission_id, str(job.status.value), started, duration,
                     job.entrypoint[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def job_logs(address: str, job_id: str, *, follow_logs: bool) -> int:
    client = connect(address)
    _check_job(client, job_id)
    if follow_logs:
        return follow(client, job_id, address)
    print(client.get_job_logs(job_id), end="", flush=True)
    return 0


def stop_job(address: str, job_id: str, timeout_s: float = 60.0) -> str:
    """Ask the cluster to stop a job and wait for it to end; returns its final status."""
    client = connect(address)
    _check_job(client, job_id)
    client.stop_job(job_id)
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            return f"{status} (still stopping after {timeout_s:.0f} s)"
        time.sleep(1.0)
    return status


def _check_job(client, job_id: str) -> None:
    try:
        client.get_job_status(job_id)
    except RuntimeError as exc:
        raise _refused(exc, f"no job '{job_id}' on this cluster") from None
