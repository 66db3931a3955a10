"""`crackray ui`: the MLflow UI over the project's tracking store.

The server replaces this process (exec), so stopping `crackray ui` stops MLflow with it.
"""

from __future__ import annotations

import os
import sys

from crackray.tracking import redact, resolve_tracking_uri, server_command


def serve(*, tracking_uri: str | None, host: str, port: int) -> None:
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is already a server: open {redact(uri)}")
        return
    print(f"MLflow UI for {uri}: http://{host}:{port}  (Ctrl+C to stop)", flush=True)
    # mlflow's server otherwise starts job-execution workers (~230 MB each) we never use.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = server_command(uri, host, port)
    sys.stderr.flush()
    os.execve(command[0], command, env)
