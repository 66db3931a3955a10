"""Every YAML under cluster/ parses and says what a GPU cluster for crackray needs; the pieces
of `crackray submit` that need no cluster (runtime env, entrypoint, exit codes, warnings)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import REPO
from packaging.requirements import Requirement

from crackray import cluster
from crackray.config import ExperimentFile, load_experiment, parse_overrides
from crackray.errors import ConfigError


def ray_excludes(root: Path, patterns: list[str]):
    """Ray's own matcher for runtime-env `excludes` (what the upload will skip)."""
    from ray._private.runtime_env.packaging import _get_excludes

    match = _get_excludes(root, patterns)
    return lambda relative: match(root / relative)

CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{package}(\[[^\]]*\])?==(\S+)", dep)
        if match:
            return match.group(2)
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


def documents(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: not YAML mappings"
    return docs


def by_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAMLS for d in documents(p) if d.get("kind") == kind]


def launcher_configs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAMLS for d in documents(p) if "provider" in d]


def test_cluster_folder_has_every_config():
    names = {p.name for p in YAMLS}
    assert {"aws-gpu.yaml", "onprem.yaml", "ray-cluster.gpu.yaml", "ray-job.tune.yaml"} <= names
    assert (CLUSTER / "README.md").is_file()
    assert {d["provider"]["type"] for _, d in launcher_configs()} == {"aws", "local"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_versions_match_the_pins(path):
    text = path.read_text()
    ray_versions = re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text)
    ray_versions += re.findall(r"rayVersion:\s*\"?(\d+\.\d+\.\d+)", text)
    ray_versions += re.findall(r"\bray(?:\[[^\]]*\])?==(\d+\.\d+\.\d+)", text)
    mlflow_versions = re.findall(r"mlflow/mlflow:v(\d+\.\d+\.\d+)", text)
    runs_ray = any("provider" in d or d.get("kind") in ("RayCluster", "RayJob")
                   for d in documents(path))
    assert ray_versions or not runs_ray, f"{path.name} names no Ray version"
    assert set(ray_versions) <= {pinned("ray")}, f"{path.name}: Ray {set(ray_versions)}"
    assert set(mlflow_versions) <= {pinned("mlflow")}, f"{path.name}: MLflow {mlflow_versions}"
    for image in re.findall(r"rayproject/ray:(\S+)", text):
        assert image.endswith("-gpu"), f"{path.name}: {image} is not a GPU image"


# ---------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("path,config", launcher_configs(), ids=lambda x: getattr(x, "name", ""))
def test_launcher_yaml_is_what_ray_up_accepts(path, config):
    # prepare_config + validate_config are the steps `ray up` runs before touching a machine.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert any("--num-gpus=0" in c for c in prepared["head_start_ray_commands"]), \
        "the head must not offer GPUs to Train workers"
    workers = [t for n, t in prepared["available_node_types"].items()
               if n != prepared["head_node_type"] or config["provider"]["type"] == "local"]
    assert workers and all(t["max_workers"] >= t["min_workers"] >= 1 for t in workers)
    assert any("pip install" in c and "crackray" in c for c in prepared["setup_commands"])
    if config["provider"]["type"] == "aws":
        assert any(t["resources"].get("GPU", 0) >= 1 for t in workers)
    else:  # on-prem machines: GPUs detected by `ray start`, passed into the container
        assert "--gpus all" in config["docker"]["run_options"]
        assert len(config["provider"]["worker_ips"]) == config["max_workers"]


# ------------------------------------------------------------------------------- KubeRay


def pvc_names() -> set[str]:
    return {d["metadata"]["name"] for _, d in by_kind("PersistentVolumeClaim")}


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == pinned("ray"), where
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0", f"{where}: the head does GPU work"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container.get("resources", {}).get("limits", {})
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims & pvc_names(), f"{where}: a pod without the shared volume"
        mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert "/mnt/shared" in mounts
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}: worker without a GPU"


def test_kuberay_ray_cluster():
    [(path, doc)] = by_kind("RayCluster")
    assert path.name == "ray-cluster.gpu.yaml" and doc["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(doc["spec"], path.name)


def test_kuberay_ray_job_runs_crackray_tune():
    [(path, doc)] = by_kind("RayJob")
    assert path.name == "ray-job.tune.yaml" and doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"], path.name)
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["crackray", "tune"]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    experiment = load_experiment(REPO / args[2], parse_overrides(sets))
    assert experiment.tune.gpus_per_worker == 1
    assert experiment.tune.storage_path.startswith("/mnt/shared")
    assert experiment.base.data.path.startswith("/mnt/shared")
    assert args[args.index("--tracking-uri") + 1].startswith("http://")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert any(p.startswith("crackray") for p in runtime_env["pip"])


def test_mlflow_server_serves_artifacts():
    [(_, deployment)] = by_kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["command"])
    assert "--serve-artifacts" in command and "--artifacts-destination" in command
    assert by_kind("Service")[0][1]["spec"]["ports"][0]["port"] == 5000


# ------------------------------------------------------------------- crackray submit parts


def test_requirements_are_pyproject_pins_without_ray():
    def parsed(lines):
        return {(r.name, frozenset(r.extras), r.specifier) for r in map(Requirement, lines)}

    expected = [d for d in PYPROJECT["project"]["dependencies"] if not d.startswith("ray")]
    assert parsed(cluster.requirements()) == parsed(expected)


def test_runtime_env_uploads_code_not_outputs():
    env = cluster.runtime_env(REPO, deps=True)
    assert env["working_dir"] == str(REPO) and "py_modules" not in env
    assert env["pip"] == cluster.requirements()
    excluded = ray_excludes(REPO, env["excludes"])
    for kept in ("crackray/data/pipeline.py", "crackray/cluster.py",
                 "search_spaces/quickstart.yaml", "pyproject.toml"):
        assert not excluded(kept), kept
    for left in (".venv/bin/python", "data/demo/manifest.json", "mlflow.db",
                 "mlartifacts/1/a/model.pt", "ray_results/job/x.json", ".git/HEAD",
                 "runs/best_model.pt", "elsewhere/part-0.parquet"):
        assert excluded(left), left


def test_runtime_env_outside_the_checkout_ships_the_package(tmp_path):
    env = cluster.runtime_env(tmp_path, deps=False)
    assert env["py_modules"] == [str(cluster.PACKAGE_DIR)] and "pip" not in env
    # the package travels whole: nothing that excludes outputs may match its own files
    excluded = ray_excludes(cluster.PACKAGE_DIR, env["excludes"])
    for module in cluster.PACKAGE_DIR.rglob("*.py"):
        assert not excluded(module.relative_to(cluster.PACKAGE_DIR)), module


def test_entrypoint_round_trips_through_the_shell():
    line = cluster.entrypoint("search_spaces/q.yaml", ("optim.lr=3e-4", "data.path=/a b"),
                              "http://mlflow:5000")
    assert shlex.split(line) == ["python", "-m", "crackray.cli", "tune", "search_spaces/q.yaml",
                                 "--set", "optim.lr=3e-4", "--set", "data.path=/a b",
                                 "--tracking-uri", "http://mlflow:5000"]


@pytest.mark.parametrize("status,driver,code", [
    ("SUCCEEDED", 0, 0), ("FAILED", 2, 2), ("FAILED", None, 1), ("STOPPED", -15, 143),
    ("STOPPED", None, 1),
])
def test_exit_code_matches_the_job(status, driver, code):
    assert cluster.exit_code(status, driver) == code


def test_warnings_name_paths_a_cluster_cannot_see():
    experiment = ExperimentFile()
    keys = " ".join(cluster.cluster_warnings(experiment, None))
    assert "data.path" in keys and "tune.storage_path" in keys and "no tracking URI" in keys
    experiment.base.data.path = "/mnt/shared/data"
    experiment.tune.storage_path = "s3://bucket/results"
    assert cluster.cluster_warnings(experiment, "http://mlflow:5000") == []


def test_auth_token_is_sent_like_ray_job_does(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("abc123\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert cluster.auth_headers() == {"Authorization": "Bearer abc123"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cluster.auth_headers() == {}


def test_submit_rejects_a_file_outside_the_upload(tmp_path):
    with pytest.raises(ConfigError, match="inside the uploaded working directory"):
        cluster.submit(str(REPO / "search_spaces" / "quickstart.yaml"), "http://127.0.0.1:9",
                       (), None, working_dir=str(tmp_path))


def test_submit_to_no_cluster_is_a_one_line_error(cli):
    result = cli("submit", REPO / "search_spaces" / "quickstart.yaml", "--address",
                 "http://127.0.0.1:9", "--working-dir", REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error: cannot reach the Ray Jobs API at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
