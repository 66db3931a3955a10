"""Shared fixtures. `import crackray` first: it makes torchvision importable on CPU torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import crackray  # noqa: F401  (before anything imports torchvision)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SDNET = SHARED_DATA / "sdnet2018"
CFD = SHARED_DATA / "crackforest_cfd"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (it lives in ../shared/data beside the clone)")
    return path


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole test session, 2 CPUs, temp dir inside pytest's tmp, with
    the environment crackray gives the local Ray it starts."""
    import ray

    from crackray.runtime import set_local_ray_environment

    set_local_ray_environment()
    temp = Path(tempfile_short())
    ray.init(
        num_cpus=2,
        _temp_dir=str(temp),
        configure_logging=True,
        logging_level="ERROR",
        include_dashboard=False,
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def tempfile_short() -> str:
    """Ray's socket paths must stay under 107 bytes: use a short folder under /tmp."""
    import tempfile

    return tempfile.mkdtemp(prefix="cr-ray-", dir="/tmp")


TINY_TUNE = ["--set", "tune.num_samples=2", "--set", "base.train.epochs=1",
             "--set", "base.data.synthetic_n=80", "--set", "base.data.image_size=32",
             "--set", "tune.scheduler.name=fifo"]  # 1 epoch: nothing for ASHA to cut short


@dataclass(frozen=True)
class TuneJob:
    """A finished tiny tuning job: the folder it ran in (its data, Ray results and MLflow
    artifacts) and the MLflow database that records it."""

    folder: Path
    db: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.db}"

    def copy(self, folder: Path) -> TuneJob:
        """The same job in a database of its own, for tests that register or log: the runs'
        artifact URIs are absolute, so they still read (and new runs write) in `self.folder`
        under fresh run ids, while the original database stays as the job left it."""
        shutil.copy2(self.db, folder / "mlflow.db")
        return TuneJob(self.folder, folder / "mlflow.db")


def run_tiny_tune(folder: Path, *overrides: str) -> TuneJob:
    """Run a 2-trial x 1-epoch tuning job of tiny synthetic tiles in `folder` with the CLI."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "crackray"), "tune",
         str(REPO / "search_spaces" / "quickstart.yaml"), *TINY_TUNE, *overrides],
        cwd=folder, env=env, capture_output=True, text=True, timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (folder / "tune.stdout").write_text(done.stdout)
    return TuneJob(folder, folder / "mlflow.db")


@pytest.fixture(scope="session")
def tiny_tune_job(tmp_path_factory) -> TuneJob:
    """One tiny tuning job for the whole session (minutes of Ray start-up and trials, which
    five modules would otherwise pay each). Read it as is; `.copy()` it to write to it."""
    return run_tiny_tune(tmp_path_factory.mktemp("tiny-tune"))


@pytest.fixture()
def cli(tmp_path):
    """Run the `crackray` command in `tmp_path`; returns CompletedProcess."""

    def run(*args, env=None, timeout=600, cwd=None):
        # The tests' own store, never the developer's: drop an inherited tracking URI.
        inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        return subprocess.run(
            [str(Path(os.sys.executable).parent / "crackray"), *map(str, args)],
            cwd=cwd or tmp_path,
            env={**inherited, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def sampled_distributions(experiment, trials: int = 60) -> dict:
    """The Optuna distribution of every searched key as crackray's define-by-run space
    suggests it (random sampling reaches every branch of the `when:` conditions)."""
    import optuna

    from crackray.tune.space import ConditionalSpace

    space = ConditionalSpace(experiment.search, experiment.base)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(trials):
        trial = study.ask()
        space(trial)
        seen.update(trial.distributions)
        study.tell(trial, 0.0)
    return seen
