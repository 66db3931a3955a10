"""What every driver (train, tune, select, report, bench) shares about a run: its data made
ready, its storage path, the parameters it logs, and its best model fetched from storage."""

from __future__ import annotations

import warnings
from pathlib import Path

from crackray import checkpoints
from crackray.config import RunConfig, flatten
from crackray.data.prepare import prepare_synthetic
from crackray.data.shards import verify_dataset
from crackray.data.splits import SPLITS, TEST, TRAIN, VAL
from crackray.errors import ConfigError
from crackray.scratch import scratch_folder
from crackray.tracking import Tracker, git_commit, versions


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
    if cfg.model.weights:
        weights = Path(cfg.model.weights).expanduser().resolve()
        if not weights.is_file():
            raise ConfigError(f"model.weights: {weights}: no such file")
        cfg.model.weights = str(weights)
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
    """(cracked, crack-free) rows of the training split as prepared."""
    totals = manifest["totals"][TRAIN]
    return totals["crack"], totals["no_crack"]


def run_params(cfg: RunConfig, manifest: dict) -> dict:
    """The MLflow params of a run: the flattened resolved config, data digest, versions."""
    return {
        **flatten(cfg.model_dump()),
        "data.digest": manifest["digest"],
        "data.dataset": manifest["dataset"],
        "git_commit": git_commit(),
        **versions(),
    }


# MLflow's dataset contexts (`mlflow.data.context`) of crackray's splits.
_DATA_CONTEXTS = {TRAIN: "training", VAL: "validation", TEST: "test"}


def log_run_lineage(tracker: Tracker, run_id: str, manifest: dict, data_path: str, *,
                    parent_run_id: str | None = None) -> None:
    """What the MLflow UI shows of a run's origin: one dataset input per non-empty split
    (digest: the manifest's; profile: the split's counts per class and surface) and the
    source tags (a trial inherits its tuning job's)."""
    tracker.log_datasets(run_id, [
        {"name": f"{manifest['dataset']}/{split}", "digest": manifest["digest"],
         "source": data_path, "context": _DATA_CONTEXTS[split],
         "profile": {"split": split, **manifest["totals"][split],
                     "surfaces": manifest["counts"][split], "manifest_digest": manifest["digest"]}}
        for split in SPLITS if manifest["totals"][split]["samples"]
    ])
    tracker.set_tags(run_id, tracker.source_tags(parent_run_id))


def fetch_best_model(checkpoint) -> Path:
    """A local copy of a run checkpoint's (a `ray.train.Checkpoint`, maybe remote) best model
    file."""
    with checkpoint.as_directory() as folder:
        local = scratch_folder("best-") / checkpoints.BEST_FILE
        local.write_bytes((Path(folder) / checkpoints.BEST_FILE).read_bytes())
    return local


# Keys that may change when a run is resumed: more epochs, more patience with failures, a
# different machine size or tracking server. Anything else would mix two runs in one.
RESUMABLE_KEYS = frozenset({
    "train.epochs", "train.max_failures", "train.threads_per_worker", "tracking.uri",
    "tracking.experiment",
})
# Params that describe the software, not the run: an upgrade does not invalidate a resume.
_ENVIRONMENT_KEYS = ("git_commit", "version.")


_RESUMABLE_KINDS = {"train": "training run", "tune": "tuning job"}


def run_to_resume(tracker: Tracker, experiment: str, kind: str, params: dict,
                  prefix: str = ""):
    """`--resume`: the latest unfinished run of `kind` ("train" or "tune") in `experiment`,
    checked against the resumed config's `params` (logged under `prefix`)."""
    previous = tracker.latest_run(experiment, kind=kind, unfinished=True)
    if previous is None:
        raise ConfigError(f"--resume: no unfinished {_RESUMABLE_KINDS[kind]} of experiment "
                          f"'{experiment}' in {tracker.uri}")
    check_resumable(previous.data.params, params, prefix)
    return previous


def check_resumable(logged: dict[str, str], params: dict, prefix: str = "") -> None:
    """Refuse a resume whose config or data differ from the run being resumed (`logged`: its
    MLflow params; `params`: `run_params` of the resumed config), naming the changed keys."""
    from crackray.tracking import safe_params

    changed = sorted(
        key
        for key, value in safe_params(params).items()
        if not key.startswith(_ENVIRONMENT_KEYS)
        and key not in RESUMABLE_KEYS
        and f"{prefix}{key}" in logged
        and logged[f"{prefix}{key}"] != value
    )
    if changed:
        shown = ", ".join(f"{k} ({logged[prefix + k]} -> {safe_params(params)[k]})"
                          for k in changed[:6])
        raise ConfigError(
            f"--resume: the config or data differ from the run being resumed: {shown}; "
            f"only {', '.join(sorted(RESUMABLE_KEYS))} may change (start a new run instead)"
        )
