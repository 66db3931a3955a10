"""`crackray ui`: the MLflow UI over the project's tracking store, opened on an experiment's
Runs table in model-training mode (MLflow 3 otherwise opens experiments on a GenAI overview).

The server replaces this process (exec), so stopping `crackray ui` stops MLflow with it.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request

from crackray.tracking import (
    Tracker,
    TrackingError,
    redact,
    resolve_tracking_uri,
    runs_table_url,
    server_command,
)

OPEN_PATIENCE_S = 120.0  # how long `--open` waits for the server to answer before giving up


def serve(*, tracking_uri: str | None, host: str, port: int, experiment: str | None = None,
          open_browser: bool = False) -> None:
    uri = resolve_tracking_uri(tracking_uri)
    experiment_id = experiment_to_show(uri, experiment)
    if uri.startswith(("http://", "https://")):
        url = runs_table_url(uri, experiment_id)
        print(f"the tracking store is already a server: open {redact(url)}")
        if open_browser:
            _open(url)
        return
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    ui = f"http://{shown_host}:{port}"
    url = runs_table_url(ui, experiment_id)
    print(f"MLflow UI for {uri}: {url}  (Ctrl+C to stop)", flush=True)
    if open_browser:
        _open_when_up(f"{ui}/health", url)
    # mlflow's server otherwise starts job-execution workers (~230 MB each) we never use.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = server_command(uri, host, port)
    sys.stderr.flush()
    os.execve(command[0], command, env)


def experiment_to_show(uri: str, experiment: str | None) -> str | None:
    """The id of `experiment` (by name), else of the experiment of the newest crackray run,
    else None (an empty store: the UI's home page)."""
    tracker = Tracker(uri)
    tracker.check_reachable()
    if experiment is None:
        return tracker.latest_crackray_experiment()
    found = tracker.client.get_experiment_by_name(experiment)
    if found is None:
        raise TrackingError(f"no MLflow experiment named {experiment!r} in {redact(uri)}")
    return found.experiment_id


def _open(url: str) -> None:
    import webbrowser

    if not webbrowser.open(url):
        print(f"crackray ui: no browser found; open {redact(url)} yourself", file=sys.stderr)


def _open_when_up(health: str, url: str) -> None:
    """Open `url` in a browser once the server answers: a forked child waits, since this
    process is about to become the server."""
    if os.fork() != 0:
        return
    try:
        deadline = time.monotonic() + OPEN_PATIENCE_S
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(health, timeout=2)
            except OSError:
                time.sleep(0.5)  # polling a server that is starting: nothing to wait on
                continue
            _open(url)
            break
    finally:
        os._exit(0)
