"""Throughput benchmarks: crackray's Ray machinery side by side with plain PyTorch.

Both sides of each comparison call the same functions (`transforms.decode_images`, `augment`,
`to_model_input`, `engine.train_one_epoch`), so a ratio measures only the machinery around
them. The sides alternate round by round (A B, B A, ...) so that a shared, noisy CPU slows
both alike; every round is kept in the result so the noise can be seen.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from crackray.config import RunConfig, load_experiment
from crackray.data import transforms
from crackray.data.shards import read_split_table, verify_dataset
from crackray.errors import ConfigError
from crackray.models import model_segments

CROSS = "crackray"
PLAIN = "baseline"
QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ------------------------------------------------------------------------ process memory
# Read from /proc rather than psutil: psutil is not a crackray dependency (Ray vendors its own).

def _proc_tree() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process on the machine."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may contain spaces
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int, tree: dict[int, list[int]]) -> list[int]:
    out, stack = [], list(tree.get(pid, []))
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(tree.get(child, []))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _memory(pid: int) -> int:
    """Proportional set size in bytes: shared pages (forked workers, mapped libraries) are
    split between the processes that share them, so a sum over processes is honest."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def dataloader_workers() -> list[int]:
    """This process and its forked children with the same command line (DataLoader workers)."""
    me = os.getpid()
    mine = _cmdline(me)
    return [me] + [p for p in _proc_tree().get(me, []) if _cmdline(p) == mine]


def ray_side() -> list[int]:
    """This process and every process it started (local Ray: GCS, raylet, workers), except
    idle DataLoader workers of the other side."""
    me = os.getpid()
    mine = _cmdline(me)
    return [me] + [p for p in _descendants(me, _proc_tree()) if _cmdline(p) != mine]


class PeakMemory:
    """Polls the summed PSS of `select()`'s processes in a thread; peak in MiB after the
    block. Both sides are measured the same way, so they stay comparable."""

    def __init__(self, select: Callable[[], list[int]], interval_s: float = 0.25):
        self.select, self.interval_s = select, interval_s
        self.peak_bytes, self._stop = 0, threading.Event()

    def _poll(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, sum(_memory(p) for p in self.select()))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


# ------------------------------------------------------------------------ plain PyTorch side


class ShardDataset(Dataset):
    """The plain-PyTorch baseline's map-style Dataset over one split: encoded bytes in memory,
    decoded and augmented a batch of indices at a time (use with a BatchSampler) by the same
    functions as crackray's map_batches step, so both sides produce the same pixels."""

    def __init__(self, data_dir: str | Path, split: str, image_size: int,
                 augment_strength: float, limit: int | None = None):
        table = read_split_table(data_dir, split, ["image", "label", "surface", "path"])
        if limit is not None:
            table = table.slice(0, limit)
        self.images = table.column("image").to_pylist()
        self.labels = table.column("label").to_numpy().astype(np.float32)
        self.surfaces = table.column("surface").to_numpy(zero_copy_only=False)
        self.paths = table.column("path").to_numpy(zero_copy_only=False)
        self.image_size, self.augment_strength = image_size, augment_strength

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> dict[str, np.ndarray]:
        images = transforms.decode_images([self.images[i] for i in indices], self.image_size)
        images, _ = transforms.augment(images, np.random.default_rng(), self.augment_strength)
        return {"image": images, "label": self.labels[indices],
                "surface": self.surfaces[indices], "path": self.paths[indices]}


def plain_loader(dataset: ShardDataset, batch_size: int, workers: int,
                 shuffle: bool = True) -> DataLoader:
    """A DataLoader as a careful hand-written script would set it up: batched fetches,
    persistent worker processes, default prefetching."""
    order = RandomSampler(dataset) if shuffle else range(len(dataset))
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False),
                      batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def plain_batches(loader: Iterable[dict], device: torch.device) -> Iterator[dict]:
    """The loader's batches as trainers consume them (what `iterate_batches` yields)."""
    for batch in loader:
        yield {"image": transforms.to_model_input(batch["image"], device),
               "label": torch.as_tensor(batch["label"]).to(device),
               "surface": batch["surface"], "path": batch["path"]}


# ------------------------------------------------------------------------ helpers


def bench_config(data: str | Path, *, image_size: int, batch_size: int, model: str = "simple_cnn",
                 epochs: int = 1, cpus_per_worker: float = 1.0,
                 threads_per_worker: int | None = None) -> RunConfig:
    """A run config for benchmarking the shards at `data` (checked against their manifest)."""
    path = Path(data).expanduser().resolve()
    verify_dataset(path)
    return RunConfig.model_validate({
        "data": {"path": str(path), "image_size": image_size},
        "model": {"name": model},
        "train": {"epochs": epochs, "workers": 1, "batch_size": batch_size,
                  "cpus_per_worker": cpus_per_worker, "threads_per_worker": threads_per_worker},
    })


def decode_rate(data: str | Path, image_size: int, sample: int = 256) -> float:
    """One process's decode + resize images/s (the per-core ceiling of any ingest)."""
    table = read_split_table(data, "train", ["image"]).slice(0, sample)
    images = table.column("image").to_pylist()
    transforms.decode_images(images[:8], image_size)  # warm Pillow's codecs
    start = time.perf_counter()
    transforms.decode_images(images, image_size)
    return len(images) / (time.perf_counter() - start)


def _drain(batches: Iterable[dict]) -> int:
    return sum(len(batch["label"]) for batch in batches)


def _start_ray() -> bool:
    """Start Ray as crackray's commands do (`train.ensure_ray`: a local Ray of our own,
    Train's settings) unless one is connected; True if we started it."""
    import ray
    import ray.data

    from crackray.runtime import ensure_ray

    if ray.is_initialized():
        return False
    ensure_ray()
    # Progress bars redraw from the consuming process; a benchmark wants no terminal chatter.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True


def _stop_ray(started: bool) -> None:
    import ray

    if started:
        ray.shutdown()


def _alternating(rounds: int) -> Iterator[tuple[int, str]]:
    """A B, B A, A B, ...: neither side always runs first (warm caches, drifting load)."""
    for r in range(rounds):
        for side in ((CROSS, PLAIN) if r % 2 == 0 else (PLAIN, CROSS)):
            yield r, side


def _rate(rounds: list[dict], side: str) -> float:
    mine = [r for r in rounds if r["side"] == side]
    return sum(r["images"] for r in mine) / max(sum(r["seconds"] for r in mine), 1e-9)


def _summary(benchmark: str, rounds: list[dict], settings: dict, peak_mib: dict[str, float],
             **extra) -> dict:
    cross, plain = _rate(rounds, CROSS), _rate(rounds, PLAIN)
    return {
        "benchmark": benchmark,
        "crackray_images_per_s": round(cross, 2),
        "baseline_images_per_s": round(plain, 2),
        "ratio": round(cross / plain, 3) if plain > 0 else math.nan,
        "crackray_peak_pss_mib": round(peak_mib[CROSS], 1),
        "baseline_peak_pss_mib": round(peak_mib[PLAIN], 1),
        **extra,
        "settings": {**settings, "cores": cores(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "rounds": rounds,
    }


# ------------------------------------------------------------------------ ingest


def bench_ingest(data: str | Path, *, batch_size: int = 32, image_size: int = 224,
                 repeats: int = 3, limit: int | None = None) -> dict:
    """Images/s of crackray's Ray Data training pipeline against a DataLoader with as many
    worker processes as Ray has CPUs, alternating, `repeats` epochs each."""
    from crackray.data.pipeline import TRAIN, build_dataset, iterate_batches

    cfg = bench_config(data, image_size=image_size, batch_size=batch_size)
    one_process = decode_rate(cfg.data.path, image_size)
    workers = cores()
    started = _start_ray()
    try:
        dataset = build_dataset(cfg, TRAIN)
        if limit is not None:
            dataset = dataset.limit(limit)
        loader = plain_loader(ShardDataset(cfg.data.path, TRAIN, image_size, cfg.data.augment,
                                           limit), batch_size, workers)
        cpu = torch.device("cpu")
        sides = {
            CROSS: (lambda: iterate_batches(dataset, batch_size, cpu, shuffle=True), ray_side),
            PLAIN: (lambda: plain_batches(loader, cpu), dataloader_workers),
        }
        for batches, _ in sides.values():  # warm-up epoch: worker processes start, imports load
            _drain(batches())
        rounds = []
        for r, side in _alternating(repeats):
            batches, _ = sides[side]
            start = time.perf_counter()
            images = _drain(batches())
            rounds.append({"round": r, "side": side, "images": images,
                           "seconds": round(time.perf_counter() - start, 3)})
        # Memory in one more, untimed epoch per side: reading PSS of Ray's ~15 processes every
        # 0.25 s costs the driver CPU, which slowed the timed Ray epochs by ~15 %.
        peak_mib = {}
        for side, (batches, processes) in sides.items():
            with PeakMemory(processes) as memory:
                _drain(batches())
            peak_mib[side] = round(memory.peak_mib, 1)
    finally:
        _stop_ray(started)
    return _summary(
        "ingest", rounds,
        {"data": cfg.data.path, "image_size": image_size, "batch_size": batch_size,
         "repeats": repeats, "workers": workers, "limit": limit},
        peak_mib,
        decode_images_per_s_one_process=round(one_process, 1),
        decode_limit_images_per_s=round(one_process * workers, 1),
    )


# ------------------------------------------------------------------------ train


def _training_parts(cfg: RunConfig, device: torch.device):
    """Model, objective and optimizer, identical (same seed) on both sides."""
    from crackray.engine import Objective
    from crackray.models import create_model
    from crackray.optim import build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, pretrained=False, dropout=cfg.model.dropout,
                         image_size=cfg.data.image_size).to(device)
    objective = Objective(cfg, 1.0, segmentation=False)
    return model, objective, build_optimizer(model, cfg.optim)


def _epoch_record(stats: dict, epoch: int) -> dict:
    return {"epoch": epoch, "images": stats["samples"], "seconds": round(stats["seconds"], 3)}


def _ray_train_loop(config: dict) -> list[dict]:
    """crackray's Train worker loop, trimmed to training: shard -> iterate_batches ->
    engine.train_one_epoch. Returns the per-epoch samples and seconds."""
    import ray.train
    import ray.train.torch

    from crackray.data.pipeline import TRAIN, iterate_batches
    from crackray.engine import train_one_epoch

    cfg = RunConfig.model_validate(config["run"])
    device = ray.train.torch.get_device()
    if device.type == "cpu" and cfg.train.threads_per_worker is not None:
        torch.set_num_threads(cfg.train.threads_per_worker)
    model, objective, optimizer = _training_parts(cfg, device)
    model = ray.train.torch.prepare_model(model)
    history = []
    for epoch in range(cfg.train.epochs):
        batches = iterate_batches(ray.train.get_dataset_shard(TRAIN), cfg.train.batch_size,
                                  device, shuffle=True)
        stats = train_one_epoch(model, batches, objective, optimizer, epoch=epoch,
                                epochs=cfg.train.epochs, grad_clip=cfg.train.grad_clip,
                                device=device)
        history.append({**_epoch_record(stats, epoch), "torch_threads": torch.get_num_threads()})
    return history


def _ray_fit(cfg: RunConfig, limit: int | None, storage: str, use_gpu: bool = False) -> list[dict]:
    import ray.train
    import ray.train.torch

    from crackray.data.pipeline import TRAIN, ExactEvalDataConfig, build_dataset

    dataset = build_dataset(cfg, TRAIN)
    if limit is not None:
        dataset = dataset.limit(limit)
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = ray.train.torch.TorchTrainer(
        _ray_train_loop,
        train_loop_config={"run": cfg.model_dump()},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"bench-{time.time_ns()}", storage_path=storage),
        datasets={TRAIN: dataset},
        dataset_config=ExactEvalDataConfig(),
    )
    return trainer.fit().return_value


def _plain_fit(cfg: RunConfig, limit: int | None, device: torch.device) -> list[dict]:
    """The same epochs in one process: decode and augment inline, then the same train step."""
    from crackray.data.pipeline import TRAIN
    from crackray.engine import train_one_epoch

    model, objective, optimizer = _training_parts(cfg, device)
    loader = plain_loader(ShardDataset(cfg.data.path, TRAIN, cfg.data.image_size,
                                       cfg.data.augment, limit), cfg.train.batch_size, 0)
    history = []
    for epoch in range(cfg.train.epochs):
        stats = train_one_epoch(model, plain_batches(loader, device), objective, optimizer,
                                epoch=epoch, epochs=cfg.train.epochs,
                                grad_clip=cfg.train.grad_clip, device=device)
        history.append({**_epoch_record(stats, epoch), "torch_threads": torch.get_num_threads()})
    return history


def _steady(history: list[dict]) -> list[dict]:
    """Epochs after the first (which pays worker start-up and imports), if there are any."""
    return history[1:] if len(history) > 1 else history


def bench_train(data: str | Path, *, model: str = "simple_cnn", image_size: int = 224,
                batch_size: int = 32, epochs: int = 2, repeats: int = 2,
                limit: int | None = None, threads: int | None = None, gpu: bool = False) -> dict:
    """Training images/s of one Ray Train worker against the same model, batches and
    optimizer in a plain loop in one process.

    The worker reserves half the CPUs and Ray Data decodes on the other half; its torch
    threads (`threads`, default: all cores, as many as the plain loop uses) also cover the
    ingest half, which decoding leaves idle most of the time next to a model's compute.
    """
    if model_segments(model):
        raise ConfigError(f"bench train: --model {model} is a segmentation model; "
                          "benchmark a classifier (e.g. simple_cnn, resnet18)")
    # Half the CPUs train, half ingest (on 2 cores: 1 + 1, as crackray's resource plan leaves).
    cfg = bench_config(data, image_size=image_size, batch_size=batch_size, model=model,
                       epochs=epochs, cpus_per_worker=max(1.0, cores() // 2),
                       threads_per_worker=threads or cores())
    cpu = torch.device("cpu")
    started = _start_ray()
    rounds = []
    try:
        with tempfile.TemporaryDirectory(prefix="crackray-bench-") as storage:
            fits = {CROSS: (lambda: _ray_fit(cfg, limit, storage), ray_side),
                    PLAIN: (lambda: _plain_fit(cfg, limit, cpu), dataloader_workers)}
            for r, side in _alternating(repeats):
                fit, processes = fits[side]
                # Training rounds last tens of seconds: a 1 s poll resolves the peak and
                # costs the timed side ~1 % of a core.
                with PeakMemory(processes, interval_s=1.0) as memory:
                    history = fit()
                steady = _steady(history)
                rounds.append({"round": r, "side": side,
                               "images": sum(e["images"] for e in steady),
                               "seconds": round(sum(e["seconds"] for e in steady), 3),
                               "torch_threads": history[0]["torch_threads"],
                               "peak_pss_mib": round(memory.peak_mib, 1)})
            extra = {"gpu": bench_gpu(cfg, limit, storage)} if gpu else {}
    finally:
        _stop_ray(started)
    return _summary(
        "train", rounds,
        {"data": cfg.data.path, "model": model, "image_size": image_size,
         "batch_size": batch_size, "epochs": epochs, "repeats": repeats, "limit": limit,
         "ray_worker_cpus": cfg.train.cpus_per_worker,
         "ray_worker_threads": cfg.train.threads_per_worker},
        {side: max(r["peak_pss_mib"] for r in rounds if r["side"] == side)
         for side in (CROSS, PLAIN)},
        **extra,
    )


def bench_gpu(cfg: RunConfig, limit: int | None, storage: str, steps: int = 20) -> dict:
    """Model-only images/s on synthetic batches already on the GPU against the same model fed
    by crackray's pipeline (one Ray Train worker with the GPU)."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from crackray.engine import train_one_epoch

    device = torch.device("cuda")
    model, objective, optimizer = _training_parts(cfg, device)
    size, n = cfg.data.image_size, cfg.train.batch_size
    batch = {"image": torch.randn(n, 3, size, size, device=device)
             .contiguous(memory_format=torch.channels_last),
             "label": (torch.rand(n, device=device) < 0.5).float()}
    train_one_epoch(model, [batch] * 3, objective, optimizer, epoch=0, epochs=1, device=device)
    torch.cuda.synchronize()
    model_only = train_one_epoch(model, [batch] * steps, objective, optimizer, epoch=0,
                                 epochs=1, device=device)  # .item() per step synchronises
    fed = _steady(_ray_fit(cfg, limit, storage, use_gpu=True))
    fed_rate = sum(e["images"] for e in fed) / max(sum(e["seconds"] for e in fed), 1e-9)
    return {"model_only_images_per_s": round(model_only["images_per_s"], 1),
            "pipeline_fed_images_per_s": round(fed_rate, 1),
            "fed_over_model_only": round(fed_rate / model_only["images_per_s"], 3),
            "device": torch.cuda.get_device_name(0)}


# ------------------------------------------------------------------------ trial


class _TrialClock:
    """Tune callback: the wall time of each trial, from the previous trial's end (or the
    start of `fit`) to its own end, so that scheduling and start-up are counted."""

    def __new__(cls):
        from ray import tune

        class Clock(tune.Callback):
            def __init__(self):
                self.mark, self.walls = time.perf_counter(), []

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._lap()

            def on_trial_error(self, iteration, trials, trial, **info):
                self._lap()

            def _lap(self):
                now = time.perf_counter()
                self.walls.append(round(now - self.mark, 3))
                self.mark = now

        return Clock()


def _plain_trial(cfg: RunConfig) -> float:
    """Seconds for the trial's epochs (train + validation) in one plain process."""
    from crackray.data.pipeline import TRAIN, VAL
    from crackray.engine import evaluate, train_one_epoch

    cpu = torch.device("cpu")
    start = time.perf_counter()
    model, objective, optimizer = _training_parts(cfg, cpu)
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
    from crackray.tune.trial import TrialContext, trial_driver

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

    start = time.perf_counter()
    started = _start_ray()
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
            tune.with_resources(tune.with_parameters(trial_driver, job=job), plan.driver_bundle),
            tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1),
            run_config=tune.RunConfig(name=name, storage_path=str(workdir / "ray_results"),
                                      callbacks=[clock], verbose=0),
        )
        results = tuner.fit()
        errors = [str(r.error) for r in results if r.error is not None]
        children = tracker.child_runs(parent, kind="trial")
        tracker.end_run(parent, "FINISHED")
        tracker.flush(timeout_s=60)
    finally:
        _stop_ray(started)
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
        "ray_start_s": round(ray_start_s, 2),
        "mlflow_child_runs": len(children),
        "settings": {"file": str(file), "trials": trials, "epochs": base.train.epochs,
                     "workers_per_trial": base.train.workers, "image_size": base.data.image_size,
                     "model": base.model.name, "workdir": str(workdir), "cores": cores(),
                     "loadavg_1m": round(os.getloadavg()[0], 2)},
    }


# ------------------------------------------------------------------------ report


def describe(result: dict) -> str:
    """Human-readable lines for a benchmark result."""
    s = result["settings"]
    if result["benchmark"] == "trial":
        return "\n".join([
            f"trial ({s['file']}: {s['epochs']} epochs, {s['workers_per_trial']} workers, "
            f"{s['model']} at {s['image_size']} px; {s['trials']} trials; load {s['loadavg_1m']})",
            f"  trial wall time       {result['trial_wall_s']:8.2f} s  "
            f"(first trial {result['first_trial_wall_s']:.2f} s; all {result['trial_walls_s']})",
            f"  same epochs, plain    {result['plain_loop_s']:8.2f} s",
            f"  fixed cost per trial  {result['fixed_cost_s']:8.2f} s",
            f"  Ray start (once/job)  {result['ray_start_s']:8.2f} s",
        ])
    settings = ", ".join(f"{k} {v}" for k, v in s.items() if k != "data")
    lines = [f"{result['benchmark']} ({settings})"]
    lines += [f"  {label:30s} {result[f'{side}_images_per_s']:9.1f} images/s   "
              f"peak PSS {result[f'{side}_peak_pss_mib']:7.0f} MiB"
              for side, label in ((CROSS, "crackray (Ray)"), (PLAIN, "plain PyTorch"))]
    lines.append(f"  ratio crackray / plain         {result['ratio']:9.3f}")
    if "decode_limit_images_per_s" in result:
        lines.append(f"  decode-only limit              {result['decode_limit_images_per_s']:9.1f}"
                     f" images/s ({result['decode_images_per_s_one_process']:.0f}/s x "
                     f"{s['workers']} processes)")
    if "gpu" in result:
        lines.append(f"  gpu: {result['gpu']}")
    lines += [f"    round {r['round']} {r['side']:8s} {r['images']:6d} images "
              f"{r['seconds']:8.2f} s" for r in result["rounds"]]
    return "\n".join(lines)
