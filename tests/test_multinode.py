"""One tuning trial on a 2-node `ray.cluster_utils.Cluster`: its two Train workers land on
different nodes, and its checkpoints go to the shared storage path.

The cluster lives in a child process (this file run as a script), so that it cannot clash
with a session-wide `ray.init` of the same pytest process (the `ray_session` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CHILD_TIMEOUT_S = 900


@pytest.mark.slow
def test_trial_workers_spread_over_two_nodes_with_shared_checkpoints(tmp_path):
    child = subprocess.Popen([sys.executable, __file__, str(tmp_path)], start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child's group: its Ray nodes, nothing else
        output, _ = child.communicate()
        pytest.fail(f"multi-node run timed out:\n{output[-4000:]}")
    assert child.returncode == 0, output[-6000:]
    found = json.loads((tmp_path / "result.json").read_text())

    assert len(found["alive_nodes"]) == 2
    worker_nodes = found["train_worker_nodes"]
    assert len(worker_nodes) == 2 and len(set(worker_nodes)) == 2, worker_nodes
    assert set(worker_nodes) <= set(found["alive_nodes"])

    [trial] = found["trials"]
    assert trial["status"] == "finished" and trial["epochs_run"] == 2
    run_dir = tmp_path / "shared" / found["job"] / "train_runs" / trial["trial_id"]
    assert (run_dir / "epoch-0001" / "best_model.pt").is_file()
    assert (run_dir / "epoch-0001" / "state.pt").is_file()
    assert not (run_dir / "epoch-0000").exists()  # num_to_keep=1: the older one is gone
    assert found["mlflow_status"] == "FINISHED"


# --------------------------------------------------------------------------- the child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args(temp_dir: str, **extra) -> dict:
    """2 CPUs a node: the trial's two 1-CPU Train workers, spread one a node, leave a CPU on
    each node to Ray Data. Own ports, not Ray's fixed defaults."""
    return {"num_cpus": 2, "temp_dir": temp_dir,
            "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
            "runtime_env_agent_port": free_port(), **extra}


def run_child(out: Path) -> None:
    import ray
    import yaml
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_nodes

    from crackray.config import load_experiment
    from crackray.tracking import Tracker
    from crackray.tune.job import run_tuning

    # 30 s (the default) is short for a raylet to register on a busy machine; Ray reads
    # this exact, lower-case name.
    os.environ["RAY_raylet_start_wait_time_s"] = "120"  # noqa: SIM112
    temp_dir = tempfile.mkdtemp(prefix="crm-", dir="/tmp")
    # Cluster records its address in Ray's default temp root, which a clean machine (or one
    # where another Ray cleaned up) may lack.
    os.makedirs(os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray"), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args=node_args(
        temp_dir, include_dashboard=True, dashboard_port=free_port()))
    try:
        cluster.add_node(**node_args(temp_dir))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")

        space = out / "multinode.yaml"
        space.write_text(yaml.safe_dump({
            "base": {
                "data": {"path": str(out / "data"), "synthetic_if_missing": True,
                         "synthetic_n": 60, "image_size": 32},
                "model": {"name": "simple_cnn"},
                "train": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 5,
                          "placement_strategy": "SPREAD"},
                "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}"},
            },
            "search": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
            "tune": {"num_samples": 1, "scheduler": {"name": "fifo"}, "workers_per_trial": 2,
                     "cpus_per_worker": 1, "storage_path": str(out / "shared")},
        }))
        summary = run_tuning(load_experiment(space), space)

        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                              raise_on_missing_output=False)
        [row] = summary.rows
        client = Tracker(summary.tracking_uri).client
        trial_run = client.get_run(row["run_id"])
        job = client.get_run(summary.parent_run_id).data.tags["crackray.job_name"]
        (out / "result.json").write_text(json.dumps({
            "alive_nodes": [n.node_id for n in list_nodes() if n.state == "ALIVE"],
            "train_worker_nodes": [w.node_id for w in workers],
            "job": job,
            "trials": [{k: row[k] for k in ("trial_id", "status", "epochs_run")}],
            "mlflow_status": trial_run.info.status,
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    run_child(Path(sys.argv[1]))
