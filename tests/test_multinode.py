"""One training run on a multi-node `ray.cluster_utils.Cluster`: its two Train workers land
on different nodes, and its checkpoints go to the shared storage path.

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
def test_train_workers_spread_over_nodes_with_shared_checkpoints(tmp_path):
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

    assert len(found["alive_nodes"]) == 3
    worker_nodes = found["train_worker_nodes"]
    assert len(worker_nodes) == 2 and len(set(worker_nodes)) == 2, worker_nodes
    assert set(worker_nodes) <= set(found["alive_nodes"])

    shared = tmp_path / "shared"
    run_dir = shared / found["ray_run_name"]
    assert found["storage_tag"] == str(shared)
    assert (run_dir / "epoch-0001" / "best_model.pt").is_file()
    assert (run_dir / "epoch-0001" / "state.pt").is_file()
    assert not (run_dir / "epoch-0000").exists()  # num_to_keep=1: the older one is gone
    assert found["epochs"] == 2 and found["status"] == "FINISHED"


# --------------------------------------------------------------------------- the child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args(temp_dir: str, **extra) -> dict:
    """1 CPU a node: one Train worker (1 CPU) fits per node, so two workers need two nodes
    and the third node's CPU is left to Ray Data. Own ports, not Ray's fixed defaults."""
    return {"num_cpus": 1, "temp_dir": temp_dir,
            "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
            "runtime_env_agent_port": free_port(), **extra}


def run_child(out: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_nodes

    from crackray.config import RunConfig
    from crackray.tracking import Tracker
    from crackray.train import run_training

    # 30 s (the default) is short for a raylet to register on a busy machine; Ray reads
    # this exact, lower-case name.
    os.environ["RAY_raylet_start_wait_time_s"] = "120"  # noqa: SIM112
    temp_dir = tempfile.mkdtemp(prefix="crm-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args=node_args(
        temp_dir, include_dashboard=True, dashboard_port=free_port()))
    try:
        for _ in range(2):
            cluster.add_node(**node_args(temp_dir))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")

        cfg = RunConfig.model_validate({
            "data": {"path": str(out / "data"), "synthetic_if_missing": True,
                     "synthetic_n": 60, "image_size": 32},
            "model": {"name": "simple_cnn"},
            "train": {"epochs": 2, "workers": 2, "cpus_per_worker": 1, "batch_size": 16,
                      "early_stopping_patience": 5},
            "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "multinode"},
        })
        result = run_training(cfg, storage_path=str(out / "shared"))

        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                              raise_on_missing_output=False)
        run = Tracker(cfg.tracking.uri).client.get_run(result.run_id)
        (out / "result.json").write_text(json.dumps({
            "alive_nodes": [n.node_id for n in list_nodes() if n.state == "ALIVE"],
            "train_worker_nodes": [w.node_id for w in workers],
            "ray_run_name": run.data.tags["crackray.ray_run_name"],
            "storage_tag": run.data.tags["crackray.storage_path"],
            "epochs": len(result.history),
            "status": run.info.status,
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    run_child(Path(sys.argv[1]))
