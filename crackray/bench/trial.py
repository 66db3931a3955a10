"""`crackray bench trial`: the fixed cost of one tuning trial, i.e. each trial's wall time in a
real Tune job minus the same epochs in one plain process."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from crackray.bench.baseline import ShardDataset, plain_batches, plain_loader
from crackray.bench.common import QUICKSTART, cores, start_ray, stop_ray, training_parts
from crackray.config import RunConfig, load_experiment
from crackray.errors import ConfigError
from crackray.train.hooks import HOOKS_ENV

TIMELINE_ENV = "CRACKRAY_BENCH_TIMELINE"


class _TrialClock:
    """Tune callback: the wall time of each trial, from the previous trial's end (or the
    start of `fit`) to its own end, so that scheduling and start-up are counted."""

    def __new__(cls):
        from ray import tune

        class Clock(tune.Callback):
            def __init__(self):
                self.mark, self.walls = time.perf_counter(), []
                self.windows = []  # (start, end) of each trial in time.time(), for the profile

            def on_trial_start(self, iteration, trials, trial, **info):
                self.windows.append([time.time(), None])

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._lap()

            def on_trial_error(self, iteration, trials, trial, **info):
                self._lap()

            def _lap(self):
                now = time.perf_counter()
                self.walls.append(round(now - self.mark, 3))
                self.mark = now
                if self.windows:
                    self.windows[-1][1] = time.time()

        return Clock()


def timeline_hook() -> _Timeline:
    """Worker hook factory (`$CRACKRAY_WORKER_HOOKS`) that `bench trial` names: the workers'
    timestamps at the loop's hook points, for the profile of a trial's seconds."""
    return _Timeline(os.environ[TIMELINE_ENV])


@dataclass(frozen=True)
class _Timeline:
    path: str

    def __call__(self, point: str, rank: int) -> None:
        me = psutil.Process()
        line = {"point": point, "rank": rank, "pid": me.pid, "t": time.time(),
                "process_start": me.create_time()}
        with open(self.path, "a") as out:  # one short append a line: ranks do not interleave
            out.write(json.dumps(line) + "\n")


def _profile(timeline: Path, windows: list) -> dict:
    """Where a trial's seconds go, median over the trials after the first: from Tune's start
    of the trial to the loop's first line on every worker (trial driver, Train controller,
    worker processes and their imports), the epochs (hook `epoch<N>`: trained, before
    evaluation) and from the last epoch to the trial's end; and how many of the trials'
    workers ran in a process started before their trial (none unless Ray hands a trial a
    pooled process; README "Performance", the warm-process row)."""
    if not timeline.exists():
        return {}
    lines = [json.loads(line) for line in timeline.read_text().splitlines()]
    phases: dict[str, list[float]] = {}
    warm = workers = 0
    for start, end in windows[1:] or windows:
        mine = [x for x in lines if start <= x["t"] <= (end or float("inf"))]
        first = {x["rank"]: x for x in mine if x["point"] == "start"}
        epochs = sorted((int(x["point"][5:]), x["t"]) for x in mine
                        if x["point"].startswith("epoch") and x["rank"] == 0)
        if not first or not epochs:
            continue
        workers += len(first)
        warm += sum(x["process_start"] < start for x in first.values())
        ready = max(x["t"] for x in first.values())
        steps = [b - a for (_, a), (_, b) in zip(epochs, epochs[1:], strict=False)]
        for key, value in {
            "start_to_loop_s": ready - start,
            "loop_to_epoch0_trained_s": epochs[0][1] - ready,
            "epoch0_to_epoch1_s": steps[0] if steps else None,
            "later_epoch_s": statistics.median(steps[1:]) if len(steps) > 1 else None,
            "last_epoch_to_trial_end_s": (end - epochs[-1][1]) if end else None,
        }.items():
            if value is not None:
                phases.setdefault(key, []).append(value)
    profile = {key: round(statistics.median(values), 2) for key, values in phases.items()}
    return {**profile, "warm_workers": f"{warm}/{workers}"} if workers else profile


def _plain_trial(cfg: RunConfig) -> float:
    """Seconds for the trial's epochs (train + validation) in one plain process."""
    from crackray.data.splits import TRAIN, VAL
    from crackray.engine import evaluate, train_one_epoch

    cpu = torch.device("cpu")
    start = time.perf_counter()
    model, objective, optimizer = training_parts(cfg, cpu)
    size = cfg.data.image_size
    train = plain_loader(ShardDataset(cfg.data.path, TRAIN, size, cfg.data.augment),
                         cfg.train.batch_size, 0)
    val = plain_loader(ShardDataset(cfg.data.path, VAL, size, 0.0), cfg.train.eval_batch_size,
                       0, shuffle=False)
    for epoch in range(cfg.train.epochs):
        train_one_epoch(model, plain_batches(train, cpu), objective, optimizer, epoch=epoch,
                        epochs=cfg.train.epochs, device=cpu)
        evaluate(model, plain_batches(val, cpu), objective, device=cpu)
    return time.perf_counter() - start


def bench_trial(file: str | Path | None = None, *, trials: int = 2,
                workdir: str | Path | None = None) -> dict:
    """The fixed cost of one tuning trial: each trial's wall time in a real Tune job
    (crackray.tune.trial.trial_driver: Ray Train workers, data streaming, an MLflow child run) minus
    the same epochs in one plain process."""
    from ray import tune

    from crackray.runs import resolve_data
    from crackray.tracking import Tracker
    from crackray.tune.resources import plan_resources, trial_base
    from crackray.tune.trial import TrialContext, trial_trainable

    file = Path(file) if file else QUICKSTART
    if not file.exists():
        raise ConfigError(f"bench trial: experiment file {file} not found (pass FILE)")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="crackray-bench-trial-")).resolve()
    experiment = load_experiment(file)
    base = trial_base(experiment)
    base.data.path = str(workdir / "data" / Path(base.data.path).name)
    base.tracking.uri = f"sqlite:///{workdir / 'mlflow.db'}"
    base, manifest = resolve_data(base)
    plain_before = _plain_trial(base)

    import ray

    # The trial drivers (processes of the local Ray started below) inherit these and hand the
    # hook to their workers.
    timeline = workdir / "timeline.jsonl"
    timeline.unlink(missing_ok=True)
    os.environ[TIMELINE_ENV] = str(timeline)
    os.environ[HOOKS_ENV] = ",".join(filter(None, [os.environ.get(HOOKS_ENV),
                                                   f"{__name__}:timeline_hook"]))
    start = time.perf_counter()
    started = start_ray()
    ray_start_s = time.perf_counter() - start
    try:
        tracker = Tracker(base.tracking.uri)
        name = f"bench-trial-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = tracker.find_or_create_run("crackray-bench", f"tune/{name}", run_name=name,
                                            kind="tune", tags={"crackray.job_name": name})
        plan = plan_resources(experiment.tune, ray.cluster_resources())
        job = TrialContext(base=base, manifest=manifest, job_name=name,
                           experiment="crackray-bench", tracking_uri=tracker.uri,
                           parent_run_id=parent, trials_storage=str(workdir / "train_runs"))
        clock = _TrialClock()
        tuner = tune.Tuner(
            trial_trainable(job, plan.driver_bundle),
            tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(workdir / "ray_results"),
                                      callbacks=[clock], verbose=0),
        )
        results = tuner.fit()
        errors = [str(r.error) for r in results if r.error is not None]
        children = tracker.child_runs(parent, kind="trial")
        tracker.end_run(parent, "FINISHED")
        tracker.flush(timeout_s=60)
    finally:
        stop_ray(started)
    if errors:
        raise RuntimeError(f"bench trial: a trial failed: {errors[0][:500]}")
    # The plain loop runs before and after the job, so that it sees the machine's load as the
    # trials did (the CPU is shared).
    plain_s = (plain_before + _plain_trial(base)) / 2
    later = clock.walls[1:] or clock.walls
    trial_s = statistics.mean(later)
    return {
        "benchmark": "trial",
        "fixed_cost_s": round(trial_s - plain_s, 2),
        "trial_wall_s": round(trial_s, 2),
        "first_trial_wall_s": clock.walls[0],
        "trial_walls_s": clock.walls,
        "plain_loop_s": round(plain_s, 2),
        "plain_epoch_s": round(plain_s / base.train.epochs, 2),
        "ray_start_s": round(ray_start_s, 2),
        "mlflow_child_runs": len(children),
        "profile": _profile(timeline, clock.windows),
        "settings": {"file": str(file), "trials": trials, "epochs": base.train.epochs,
                     "workers_per_trial": base.train.workers, "image_size": base.data.image_size,
                     "model": base.model.name, "workdir": str(workdir), "cores": cores(),
                     "loadavg_1m": round(os.getloadavg()[0], 2)},
    }
