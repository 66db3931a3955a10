"""A real two-node Ray cluster on 127.0.0.1, started by this test with its own temp dirs and
ports: `crackray submit` sends a tiny tuning job through the Ray Jobs API, which must end
SUCCEEDED with its MLflow runs; `crackray jobs` lists, shows and stops jobs. The test stops
exactly the processes it started (never `ray stop`, which would end everyone's Ray)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO

from crackray.cluster import auth_headers

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
OBJECT_STORE = str(200 * 1024**2)  # keep the two nodes small on a shared machine


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_ports() -> list[str]:
    """Every port a node would otherwise take from Ray's fixed defaults (52365, 10001, ...),
    which other Ray instances on this machine may hold."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    return [f"{name}={port}" for name, port in zip(names, free_ports(len(names)), strict=True)]


class RayNode:
    """One `ray start --block` process: the node's processes are its children, so stopping
    it and what it started (by PID) stops the node and nothing else."""

    def __init__(self, args: list[str], log: Path, env: dict):
        self.log = log
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
             "--node-ip-address=127.0.0.1", f"--object-store-memory={OBJECT_STORE}", *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def wait_started(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while "block forever" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM to `ray start` and every process it started (its node shuts down), then
        SIGKILL to whatever of them is still there."""
        started = [self.proc.pid, *descendants(self.proc.pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 30
            while any(alive(pid) for pid in started) and time.monotonic() < deadline:
                self.proc.poll()  # reap our direct child
                time.sleep(0.5)


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid`, from /proc (job drivers leave the process
    group, so the group alone would miss them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def get_json(url: str) -> dict:
    request = urllib.request.Request(url, headers=auth_headers())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_for_nodes(dashboard: str, count: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            nodes = get_json(f"{dashboard}/api/v0/nodes")["data"]["result"]["result"]
            if sum(n["state"] == "ALIVE" for n in nodes) >= count:
                return
        except (OSError, KeyError, ValueError):
            pass  # the dashboard is still starting
        time.sleep(2)
    pytest.fail(f"the cluster at {dashboard} did not reach {count} alive nodes")


@pytest.fixture(scope="module")
def local_cluster():
    """A head (2 CPUs) and a second node (1 CPU) on 127.0.0.1; yields the Jobs API URL."""
    head_dir = tempfile.mkdtemp(prefix="crh-", dir="/tmp")
    worker_dir = tempfile.mkdtemp(prefix="crw-", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    env["RAY_raylet_start_wait_time_s"] = "120"  # the default 30 s is short on a busy machine
    if auth_headers():
        # A head finds ~/.ray/auth_token by itself and turns token auth on; a joining node
        # only does so when told, else the GCS turns it away.
        env["RAY_AUTH_MODE"] = "token"
    gcs, dashboard, client = free_ports(3)
    nodes = []
    try:
        head = RayNode(["--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
                        "--include-dashboard=true", f"--ray-client-server-port={client}",
                        "--num-cpus=2", "--num-gpus=0", f"--temp-dir={head_dir}", *node_ports()],
                       Path(head_dir) / "start.log", env)
        nodes.append(head)
        head.wait_started()
        worker = RayNode([f"--address=127.0.0.1:{gcs}", "--num-cpus=1", "--num-gpus=0",
                          f"--temp-dir={worker_dir}", *node_ports()],
                         Path(worker_dir) / "start.log", env)
        nodes.append(worker)
        worker.wait_started()
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_nodes(url, 2)
        yield url
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


def test_submit_tiny_tuning_job(local_cluster, cli, tmp_path):
    store = tmp_path / "mlflow.db"
    start = time.perf_counter()
    result = cli(
        "submit", "search_spaces/quickstart.yaml", "--address", local_cluster, "--no-deps",
        "--tracking-uri", f"sqlite:///{store}",  # absolute: the job on the head writes here
        "--set", f"data.path={tmp_path / 'data'}", "--set", "data.synthetic_n=60",
        "--set", "data.image_size=32", "--set", "train.epochs=1",
        "--set", "tune.num_samples=1", "--set", f"tune.storage_path={tmp_path / 'results'}",
        cwd=REPO, timeout=900,
    )
    seconds = time.perf_counter() - start
    print(f"submit-to-finished wall time: {seconds:.1f} s")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    job_id = result.stdout.split("submitted job ", 1)[1].split()[0]
    assert f"job {job_id} SUCCEEDED (exit code 0)" in result.stdout
    # the job's own log, streamed back: it saw both nodes' CPUs
    assert "resource plan: 3 CPUs" in result.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("crackray.kind") == "tune"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(trials) == 1
    assert trials[0].data.tags["crackray.trial_status"] == "finished"
    assert 0.0 <= trials[0].data.metrics["val/f1"] <= 1.0
    artifacts = [a.path for a in client.list_artifacts(trials[0].info.run_id, "checkpoints")]
    assert "checkpoints/best_model.pt" in artifacts
    job_name = parent.data.tags["crackray.job_name"]
    assert (tmp_path / "results" / job_name / "train_runs").is_dir()

    listed = cli("jobs", "list", "--address", local_cluster, cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if line.startswith(job_id)]
    assert row.split()[1] == "SUCCEEDED"
    logs = cli("jobs", "logs", job_id, "--address", local_cluster, cwd=REPO)
    assert logs.returncode == 0 and "resource plan: 3 CPUs" in logs.stdout


def test_stop_a_submitted_job(local_cluster, cli, tmp_path):
    submitted = cli(
        "submit", "search_spaces/quickstart.yaml", "--address", local_cluster, "--no-deps",
        "--no-wait", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--set", f"data.path={tmp_path / 'data'}", "--set", "data.synthetic_n=60",
        cwd=REPO, timeout=300,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("submitted job ", 1)[1].split()[0]
    assert f"crackray jobs stop {job_id}" in submitted.stdout
    stopped = cli("jobs", "stop", job_id, "--address", local_cluster, cwd=REPO, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"job {job_id} STOPPED"
    missing = cli("jobs", "stop", "no-such-job", "--address", local_cluster, cwd=REPO)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr
