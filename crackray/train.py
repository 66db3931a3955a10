"""Ray Train: `train_fn_per_worker` runs on every worker; `build_trainer` and `run_training`
are the driver side. One epoch of maths lives in `engine.py`; this file adds the distributed
parts: dataset shards, checkpoints, early stopping, resume and rank-0 tracking.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch

from crackray import checkpoints
from crackray.config import RunConfig, flatten, save_resolved
from crackray.data.pipeline import (
    TEST,
    TRAIN,
    VAL,
    ExactEvalDataConfig,
    build_dataset,
    epoch_rows,
    iterate_batches,
    overlay_examples,
    positive_repeats,
)
from crackray.data.prepare import prepare_synthetic
from crackray.data.shards import verify_dataset
from crackray.engine import EvalOutputs, Objective, evaluate, gather, train_one_epoch
from crackray.evaluation import (
    log_decision_artifacts,
    log_mask_overlays,
    pixel_split_metrics,
    split_metrics,
    test_report,
)
from crackray.losses import resolve_pos_weight
from crackray.models import create_model
from crackray.optim import Schedule, build_optimizer
from crackray.sampling import frequency_sampler, keep_rows, lockstep
from crackray.tracking import Tracker, git_commit, versions

SEGMENTATION_MODELS = ("segdec", "segdec_tiny")
# Test-only fault injection (tests/test_faults_*.py): a folder where workers record their pid
# at named points and find the faults the test asks for. Unset in real runs: no effect.
FAULT_DIR_ENV = "CRACKRAY_TEST_FAULT_DIR"
# How long rank 0 waits at the end for an absent tracking server to take its buffered writes.
FLUSH_PATIENCE_S = 300.0


def is_segmentation(cfg: RunConfig) -> bool:
    return cfg.model.name in SEGMENTATION_MODELS


@dataclass
class TrainingState:
    """What must survive a restart besides weights: progress, early stopping, history."""

    next_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    def record(self, epoch: int, metrics: dict, score: float, min_delta: float) -> bool:
        """Store the epoch's metrics; True if `score` beats the best by more than min_delta."""
        self.history.append({"epoch": epoch, **metrics})
        self.next_epoch = epoch + 1
        if not math.isnan(score) and score > self.best_score + min_delta:
            self.best_score, self.best_epoch, self.stale_epochs = score, epoch, 0
            return True
        self.stale_epochs += 1
        return False


def selection_score(cfg: RunConfig, metrics: dict) -> float:
    """The validation score that picks the best checkpoint (and drives early stopping)."""
    if not is_segmentation(cfg) or cfg.train.best_model == "dec":
        return metrics["val/f1"]
    if cfg.train.best_model == "seg":
        return metrics["val/pixel_f1"]
    return (metrics["val/f1"] + metrics["val/pixel_f1"]) / 2


class EpochLogger:
    """Rank 0's view of the MLflow run: per-epoch metrics, artifacts on improvement."""

    def __init__(self, tracking: dict, cfg: RunConfig, segmentation: bool):
        self.tracker = Tracker(tracking["uri"])
        self.run_id = tracking["run_id"]
        self.segmentation = segmentation
        # segdec: fixed validation images whose predicted masks are drawn every few epochs
        self.examples = overlay_examples(cfg, VAL) if segmentation else None

    def catch_up(self, history: list[dict]) -> None:
        """Log epochs that a restored checkpoint knows but MLflow does not (a crash between
        checkpoint and logging); epochs MLflow already has are never logged twice."""
        logged = self.tracker.logged_steps(self.run_id, "val/f1")
        for row in history:
            if row["epoch"] not in logged:
                self.tracker.log_metrics(self.run_id, _numeric(row), step=row["epoch"])

    def log_epoch(
        self, epoch: int, metrics: dict, val: EvalOutputs, improved: bool, best_file: Path | None
    ) -> None:
        self.tracker.log_metrics(self.run_id, _numeric(metrics), step=epoch)
        if improved:
            log_decision_artifacts(self.tracker, self.run_id, val, 0.5, "val")
            self.tracker.log_artifact(self.run_id, best_file, "checkpoints")
            self.tracker.set_tags(self.run_id, {"crackray.best_epoch": epoch})


def _numeric(row: dict) -> dict:
    return {
        k: v
        for k, v in row.items()
        if isinstance(v, int | float) and k not in ("epoch", "epochs_planned")
    }


def fault_point(fault_dir: str | None, point: str, rank: int) -> None:
    """Test-only: write `<point>.rank<R>.pid`; then, on rank 0, raise while the counter in
    `<point>.raise` is positive (decremented per raise), and on every rank wait while
    `<point>.hold` exists (the test kills this process meanwhile)."""
    if not fault_dir:
        return
    folder = Path(fault_dir)
    (folder / f"{point}.rank{rank}.pid").write_text(str(os.getpid()))
    counter = folder / f"{point}.raise"
    if rank == 0 and counter.exists() and int(counter.read_text() or 0) > 0:
        counter.write_text(str(int(counter.read_text()) - 1))
        raise RuntimeError(f"injected test fault at {point}")
    deadline = time.monotonic() + 300
    while (folder / f"{point}.hold").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def restart_candidates(run_folder: str | None) -> list[ray.train.Checkpoint]:
    """Checkpoints to restart from, best first: epoch folders of this run newer than Ray's
    latest registered checkpoint, then that one. The controller registers a report only at
    its next poll of the workers, so a worker dying in between loses the registration, yet
    rank 0 has already written that checkpoint and logged its epoch to MLflow: restarting
    from the older one would train and log that epoch twice."""
    registered = ray.train.get_checkpoint()
    newer = []
    if run_folder:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(run_folder)
        selector = pyarrow.fs.FileSelector(root, allow_not_found=True)
        known = Path(registered.path).name if registered else ""
        folders = sorted(
            (
                e.path
                for e in filesystem.get_file_info(selector)
                if e.type == pyarrow.fs.FileType.Directory
                and e.base_name.startswith("epoch-")
                and e.base_name > known
            ),
            reverse=True,
        )
        newer = [ray.train.Checkpoint(path, filesystem=filesystem) for path in folders]
    return newer + ([registered] if registered else [])


def set_cpu_threads(cfg: RunConfig, device: torch.device) -> None:
    """Apply `train.threads_per_worker` (CPU only; Ray already set one per reserved CPU)."""
    if device.type == "cpu" and cfg.train.threads_per_worker is not None:
        torch.set_num_threads(cfg.train.threads_per_worker)


def train_fn_per_worker(config: dict) -> None:
    """The Ray Train loop: the same code on every worker; rank 0 also checkpoints and logs."""
    cfg = RunConfig.model_validate(config["run"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    set_cpu_threads(cfg, device)
    segmentation = is_segmentation(cfg)
    torch.manual_seed(cfg.train.seed)
    fault_point(config.get("fault_dir"), "start", rank)

    model = create_model(
        cfg.model.name,
        pretrained=cfg.model.pretrained,
        dropout=cfg.model.dropout,
        image_size=cfg.data.image_size,
    )
    if segmentation:
        model.gradient_adjustment = cfg.train.gradient_adjustment
    if device.type == "cuda":
        # Batches arrive channels-last (transforms.to_model_input); weights in the same layout
        # let cuDNN pick its NHWC kernels instead of converting at every convolution.
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    objective = Objective(cfg, config["pos_weight"], segmentation)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    schedule = Schedule(optimizer, cfg.optim, cfg.train.epochs, config["steps_per_epoch"])
    state, best_weights = TrainingState(), None

    for checkpoint in restart_candidates(config.get("run_folder")):
        try:
            with checkpoint.as_directory() as folder:
                saved = torch.load(Path(folder) / checkpoints.STATE_FILE, weights_only=True)
                best_weights = checkpoints.load_model_file(Path(folder) / checkpoints.BEST_FILE)[
                    "model_state"
                ]
        except Exception as exc:  # noqa: BLE001 - half-written by a dying worker: try older
            warnings.warn(f"skipping unreadable checkpoint {checkpoint.path}: {exc}", stacklevel=1)
            continue
        checkpoints.unwrap(model).load_state_dict(saved["model_state"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state = TrainingState(**saved["training_state"])
        break

    logger = None
    if rank == 0 and config.get("tracking"):
        logger = EpochLogger(config["tracking"], cfg, segmentation)
        logger.catch_up(state.history)

    bf16, epochs = cfg.train.bf16, cfg.train.epochs
    sampler = frequency_sampler(cfg)  # None unless data.frequency_sampling
    for epoch in range(state.next_epoch, epochs):
        train_batches = iterate_batches(
            ray.train.get_dataset_shard(TRAIN),
            cfg.train.batch_size,
            device,
            shuffle=True,
            keep=keep_rows(sampler.selection(epoch)) if sampler else None,
        )
        if sampler:
            train_batches = lockstep(train_batches, device)
        train_stats = train_one_epoch(
            model,
            train_batches,
            objective,
            optimizer,
            epoch=epoch,
            epochs=epochs,
            schedule=schedule,
            grad_clip=cfg.train.grad_clip,
            bf16=bf16,
            device=device,
        )
        # Mid-epoch: trained but neither evaluated nor checkpointed.
        fault_point(config.get("fault_dir"), f"epoch{epoch}", rank)
        val_batches = iterate_batches(
            ray.train.get_dataset_shard(VAL), cfg.train.eval_batch_size, device
        )
        # The plain module, not DDP: DDP's forward broadcasts buffers, a collective that hangs
        # when the disjoint evaluation shards give the workers different batch counts.
        val = gather(
            evaluate(
                checkpoints.unwrap(model),
                val_batches,
                objective,
                epoch=epoch,
                epochs=epochs,
                bf16=bf16,
                device=device,
                keep_seg_maps=segmentation,
            )
        )
        metrics = {f"train/{k}": v for k, v in train_stats.items()}
        metrics.update(split_metrics(val, VAL))
        if segmentation:
            metrics.update(pixel_split_metrics(val, VAL)[1])
        metrics["epoch"] = epoch
        metrics["epochs_planned"] = epochs
        improved = state.record(
            epoch, metrics, selection_score(cfg, metrics), cfg.train.early_stopping_min_delta
        )
        schedule.step_epoch(metrics["val/f1"])
        if improved:
            best_weights = checkpoints.cpu_state(model)
        stop = state.stale_epochs >= cfg.train.early_stopping_patience
        metrics["early_stopped"] = int(stop)

        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint, best_file = None, None
            if rank == 0:
                torch.save(
                    {
                        "model_state": checkpoints.cpu_state(model),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "training_state": asdict(state),
                    },
                    Path(folder) / checkpoints.STATE_FILE,
                )
                best_file = checkpoints.save_model_file(
                    Path(folder) / checkpoints.BEST_FILE,
                    best_weights,
                    cfg,
                    epoch=state.best_epoch,
                    val_score=state.best_score,
                )
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(
                metrics, checkpoint=report_checkpoint, checkpoint_dir_name=f"epoch-{epoch:04d}"
            )
            if logger:
                logger.log_epoch(epoch, metrics, val, improved, best_file)
                last = stop or epoch == epochs - 1
                if segmentation and ((epoch + 1) % cfg.train.log_masks_every == 0 or last):
                    log_mask_overlays(
                        logger.tracker,
                        logger.run_id,
                        checkpoints.unwrap(model),
                        logger.examples,
                        metrics["val/pixel_threshold"],
                        f"masks/val-epoch-{epoch:04d}.png",
                        device,
                    )
        if stop:
            break
    if logger and not logger.tracker.flush(timeout_s=FLUSH_PATIENCE_S):
        warnings.warn(
            f"MLflow unreachable for {FLUSH_PATIENCE_S:.0f} s after training: "
            "the last tracking writes of this run are lost",
            stacklevel=1,
        )


# ---------------------------------------------------------------------------------------------
# Driver side


def resolve_data(cfg: RunConfig) -> tuple[RunConfig, dict]:
    """Make `data.path` absolute (workers run elsewhere), create demo data if asked, verify
    the shards against their manifest and warn about one-class splits; returns the updated
    config and the manifest."""
    path = Path(cfg.data.path).expanduser().resolve()
    if not path.exists() and cfg.data.synthetic_if_missing:
        print(f"crackray: making {cfg.data.synthetic_n} synthetic demo tiles in {path}")
        prepare_synthetic(path, n=cfg.data.synthetic_n, seed=cfg.train.seed)
    cfg = cfg.model_copy(deep=True)
    cfg.data.path = str(path)
    manifest = verify_dataset(path)
    warn_one_class_splits(manifest)  # train and tune alike
    return cfg, manifest


def absolute_storage(path: str) -> str:
    """Local storage paths made absolute (Ray's workers run elsewhere); URIs kept as they are."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def warn_one_class_splits(manifest: dict) -> None:
    """Say up front when a split lacks crack-free samples: its decision precision and AUROC
    are then undefined (NaN, left out of MLflow), not a perfect 1.0."""
    for split, totals in manifest["totals"].items():
        if totals["samples"] and totals["no_crack"] == 0:
            warnings.warn(
                f"data: the {split} split of {manifest['dataset']} has no crack-free sample, so "
                "its decision precision and AUROC are undefined and not logged; for CrackForest "
                "prepare with --tile N to get crack-free tiles as negatives",
                stacklevel=2,
            )


def train_counts(manifest: dict) -> tuple[int, int]:
    totals = manifest["totals"][TRAIN]
    return totals["crack"], totals["no_crack"]


def run_params(cfg: RunConfig, manifest: dict) -> dict:
    return {
        **flatten(cfg.model_dump()),
        "data.digest": manifest["digest"],
        "data.dataset": manifest["dataset"],
        "git_commit": git_commit(),
        **versions(),
    }


def build_trainer(
    cfg: RunConfig,
    manifest: dict,
    *,
    tracking: dict | None,
    name: str,
    storage_path: str,
    callbacks: list | None = None,
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of one run: workers, datasets, checkpointing and failure policy."""
    n_pos, n_neg = train_counts(manifest)
    repeats = positive_repeats(cfg, n_pos, n_neg)
    rows_per_worker = epoch_rows(cfg, n_pos, n_neg) // cfg.train.workers
    segmentation = is_segmentation(cfg)
    datasets = {
        TRAIN: build_dataset(cfg, TRAIN, with_masks=segmentation, positive_repeats=repeats),
        VAL: build_dataset(cfg, VAL, with_masks=segmentation),
    }
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    return ray.train.torch.TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "run": cfg.model_dump(),
            "pos_weight": resolve_pos_weight(cfg.loss, n_pos, n_neg),
            "steps_per_epoch": max(1, math.ceil(rows_per_worker / cfg.train.batch_size)),
            "tracking": tracking,
            "fault_dir": os.environ.get(FAULT_DIR_ENV),
            "run_folder": f"{storage_path}/{name}",
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ExactEvalDataConfig(),
    )


def predict_split(
    model: torch.nn.Module, cfg: RunConfig, split: str, device: torch.device | None = None
) -> EvalOutputs:
    """Evaluate a model on a whole split in this process (test, select, report)."""
    device = device or torch.device("cpu")
    segmentation = is_segmentation(cfg)
    objective = Objective(cfg, 1.0, segmentation)
    dataset = build_dataset(cfg, split, with_masks=segmentation)
    batches = iterate_batches(dataset, cfg.train.eval_batch_size, device)
    return evaluate(model.to(device), batches, objective, device=device, keep_seg_maps=segmentation)


def fetch_best_model(checkpoint: ray.train.Checkpoint) -> Path:
    """A local copy of a run checkpoint's best-F1 model file (the checkpoint may be remote)."""
    with checkpoint.as_directory() as folder:
        local = Path(tempfile.mkdtemp(prefix="crackray-best-")) / checkpoints.BEST_FILE
        local.write_bytes((Path(folder) / checkpoints.BEST_FILE).read_bytes())
    return local


def evaluate_on_test(tracker: Tracker, run_id: str, model_file: Path) -> dict[str, float]:
    """Test once, with the best checkpoint: metrics at 0.5 and at the val-F1 threshold, the
    per-surface table and the test confusion matrix / curves, all logged to the run."""
    model, cfg, _ = checkpoints.build_model_from_file(model_file)
    val, test = predict_split(model, cfg, VAL), predict_split(model, cfg, TEST)
    threshold, metrics = test_report(val, test)
    if is_segmentation(cfg):
        pixel_threshold, _ = pixel_split_metrics(val, VAL)
        metrics.update(pixel_split_metrics(test, TEST, pixel_threshold)[1])
    tracker.log_metrics(run_id, metrics)
    log_decision_artifacts(tracker, run_id, test, threshold, "test")
    return metrics


@dataclass
class TrainingResult:
    run_id: str
    best_model: Path
    history: list[dict]
    test_metrics: dict[str, float]
    seconds: float


def run_training(
    cfg: RunConfig,
    *,
    resume: bool = False,
    storage_path: str = "ray_results",
    experiment: str | None = None,
) -> TrainingResult:
    """`crackray train`: one Ray Train run tracked as one MLflow run, then one test pass."""
    start = time.perf_counter()
    cfg, manifest = resolve_data(cfg)
    tracker = Tracker(cfg.tracking.uri)
    tracker.check_reachable()
    experiment = experiment or cfg.tracking.experiment or "crackray"
    storage = absolute_storage(storage_path)

    name = _resumable_run_name(tracker, experiment) if resume else None
    name = name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = tracker.find_or_create_run(
        experiment,
        f"train/{name}",
        run_name=name,
        kind="train",
        tags={"crackray.ray_run_name": name, "crackray.storage_path": storage},
    )
    tracker.log_params(run_id, run_params(cfg, manifest))
    with tempfile.TemporaryDirectory() as folder:
        tracker.log_artifact(run_id, save_resolved(cfg, Path(folder) / "config.yaml"))

    ensure_ray()
    trainer = build_trainer(
        cfg,
        manifest,
        tracking={"uri": tracker.uri, "run_id": run_id},
        name=name,
        storage_path=storage,
    )
    result = trainer.fit()
    best = fetch_best_model(result.checkpoint)
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(Path(folder) / checkpoints.STATE_FILE, weights_only=True)
    history = saved["training_state"]["history"]
    test_metrics = evaluate_on_test(tracker, run_id, best)
    tracker.end_run(run_id, "FINISHED")
    tracker.flush(timeout_s=60)
    return TrainingResult(run_id, best, history, test_metrics, time.perf_counter() - start)


def _resumable_run_name(tracker: Tracker, experiment: str) -> str | None:
    """The Ray run name of the latest unfinished `train` run of this experiment."""
    run = tracker.latest_run(experiment, kind="train", unfinished=True)
    return run.data.tags.get("crackray.ray_run_name") if run else None


# Ray Train's controller collects the workers' reports at its health-check poll (every 2 s by
# default), and a worker's `report` blocks until its previous one was collected: with epochs
# of about 2 s (quickstart trials) every epoch stalled ~0.9 s. A 0.5 s poll costs a few cheap
# actor calls a second. A value already in the environment wins.
RAY_ENV_VARS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS, set inside a Ray job), or start a local Ray
    once per process (the embedded default)."""
    if not ray.is_initialized():
        # "local", not None: with None, ray.init attaches to the newest Ray started on this
        # machine by anyone (/tmp/ray/ray_current_cluster), and hangs if that one has died.
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        env_vars = {key: os.environ.get(key, value) for key, value in RAY_ENV_VARS.items()}
        if address == "local":
            _isolate_local_ray()
            os.environ.update(env_vars)  # the local Ray's processes inherit this environment
            runtime_env = None
        else:
            runtime_env = {"env_vars": env_vars}  # merged into a submitted job's own env
        ray.init(
            address=address,
            runtime_env=runtime_env,
            configure_logging=True,
            logging_level="WARNING",
        )
        if address == "local":
            from ray._private.utils import write_ray_address

            write_ray_address(ray.get_runtime_context().gcs_address)


def _isolate_local_ray() -> None:
    """Give this process's local Ray a temp root of its own, where its address is recorded.

    Ray's helper actors look their cluster up by address file; Train's placement-group
    cleaner does so when Tune stops a trial. With another Ray on the machine and no file,
    that lookup fails, the stopped trial's placement group leaks and the next trial's Ray
    Data tasks wait for CPUs forever. A private RAY_TMPDIR (inherited by every Ray process
    started from here) makes the lookup find this cluster and no other.
    """
    if "RAY_TMPDIR" not in os.environ:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="crackray-ray-", dir="/tmp")
