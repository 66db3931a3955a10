"""SegDecNet training end to end on CrackForest, plus the frequency-of-use sampler.

The slow tests train a tiny segdec on 2 Ray Train CPU workers over a 40-photo subset of
CrackForest cut into 160 px tiles (crack-free tiles are the negatives) and read back what
MLflow holds: decision and 2-pixel metrics, and the predicted-mask overlays.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import pytest
from conftest import CFD, REPO, require

from crackray.config import load_experiment
from crackray.data.composition import epoch_rows
from crackray.data.shards import read_manifest
from crackray.runs import warn_one_class_splits
from crackray.sampling import FrequencySampler
from crackray.tracking import Tracker
from crackray.train.driver import run_training

SEARCH_SPACE = REPO / "search_spaces" / "segdec_crack.yaml"
PHOTOS = 40  # of CrackForest's 118: 240 tiles keep two epochs under a minute

DECISION_KEYS = ("f1", "precision", "recall", "accuracy", "auroc", "threshold",
                 "tp", "fp", "fn", "tn")
PIXEL_KEYS = ("pixel_f1", "pixel_precision", "pixel_recall", "pixel_dice", "pixel_iou",
              "segdec_f1", "segdec_precision", "segdec_recall", "segdec_threshold")


# ------------------------------------------------------------------------- frequency sampling


def test_frequency_sampler_uses_every_negative_equally_often():
    sampler = FrequencySampler([f"n{i}" for i in range(10)], per_epoch=4, seed=3)
    counts = sampler.counts_before(5)  # 5 epochs x 4 draws over 10 negatives
    assert counts.tolist() == [2] * 10
    # The least used come first: after epoch 0, epoch 1 draws none of epoch 0's four.
    assert not sampler.selection(0) & sampler.selection(1)
    # Pure function of (ids, seed, epoch): another worker computes the same set.
    twin = FrequencySampler([f"n{i}" for i in reversed(range(10))], per_epoch=4, seed=3)
    assert twin.selection(7) == sampler.selection(7)


def test_frequency_sampler_with_few_negatives_takes_them_all():
    sampler = FrequencySampler(["a", "b", "c"], per_epoch=50)
    assert sampler.selection(0) == sampler.selection(4) == {"a", "b", "c"}


def test_epoch_rows_with_frequency_sampling_draws_as_many_negatives_as_positives():
    cfg = load_experiment(SEARCH_SPACE, {"data.frequency_sampling": True}).base
    assert epoch_rows(cfg, n_pos=30, n_neg=200) == 60
    assert epoch_rows(cfg, n_pos=30, n_neg=10) == 40


def test_split_without_negatives_warns():
    manifest = {"dataset": "cfd", "totals": {
        "train": {"samples": 5, "crack": 5, "no_crack": 0},
        "val": {"samples": 3, "crack": 2, "no_crack": 1},
    }}
    with pytest.warns(UserWarning, match="train split of cfd has no crack-free sample"):
        warn_one_class_splits(manifest)


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def cfd_tiles(tmp_path_factory):
    """A 40-photo CrackForest subset, prepared with --tile 160 (6 tiles a photo)."""
    from crackray.data.prepare import prepare_cfd

    src = require(CFD)
    subset = tmp_path_factory.mktemp("cfd_subset")
    for folder in ("images", "masks"):
        (subset / folder).mkdir()
    for image in sorted((src / "images").glob("*.jpg"))[:PHOTOS]:
        shutil.copy(image, subset / "images" / image.name)
        shutil.copy(src / "masks" / f"{image.stem}.png", subset / "masks" / f"{image.stem}.png")
    out = tmp_path_factory.mktemp("cfd160") / "data"
    manifest = prepare_cfd(subset, out, tile=160)
    assert all(t["no_crack"] > 0 for t in manifest["totals"].values()), "tiling made no negatives"
    return out


def _train(data: Path, tmp_path: Path, **overrides):
    settings = {
        "data.path": str(data), "data.image_size": 64, "model.name": "segdec_tiny",
        "train.epochs": 2, "train.workers": 2, "train.batch_size": 16,
        "train.log_masks_every": 1, "loss.dynamic_balance": False, "loss.delta_cls": 1.0,
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", **overrides,
    }
    cfg = load_experiment(SEARCH_SPACE, settings).base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray / MLflow deprecation chatter
        result = run_training(cfg, storage_path=str(tmp_path / "ray_results"))
    tracker = Tracker(cfg.tracking.uri)
    return result, tracker.client.get_run(result.run_id), tracker


def _artifacts(tracker: Tracker, run_id: str, path: str) -> list[str]:
    return [a.path for a in tracker.client.list_artifacts(run_id, path)]


@pytest.mark.slow
def test_two_workers_log_decision_and_pixel_metrics(ray_session, cfd_tiles, tmp_path):
    result, run, tracker = _train(cfd_tiles, tmp_path)
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    for split in ("val", "test"):
        for key in (*DECISION_KEYS, *PIXEL_KEYS):
            value = metrics.get(f"{split}/{key}")
            assert value is not None and math.isfinite(value), f"{split}/{key}: {value}"
        assert 0 <= metrics[f"{split}/pixel_f1"] <= 1
        counts = [metrics[f"{split}/{k}"] for k in ("tp", "fp", "fn", "tn")]
        assert sum(counts) == metrics[f"{split}/samples"]
        assert metrics[f"{split}/negatives"] > 0
    # The segdec loss parts are logged per epoch, next to the total.
    history = tracker.client.get_metric_history(run.info.run_id, "train/seg")
    assert sorted(m.step for m in history) == [0, 1]
    assert math.isfinite(metrics["train/dec"])
    # Predicted-mask overlays every epoch (log_masks_every=1), and the best checkpoint.
    assert _artifacts(tracker, run.info.run_id, "masks") == [
        "masks/val-epoch-0000.png", "masks/val-epoch-0001.png"]
    assert "checkpoints/best_model.pt" in _artifacts(tracker, run.info.run_id, "checkpoints")
    assert len(result.history) == 2

    # Both pixel protocols on test, each at the threshold swept on validation.
    for protocol in ("pixel", "segdec"):
        assert 0 <= metrics[f"test/{protocol}_f1"] <= 1
        assert 0 < metrics[f"test/{protocol}_threshold"] < 1
        assert math.isfinite(metrics[f"val/{protocol}_f1"])

    # The report carries the results page's 2-pixel-distance table (the SegDec protocol): the
    # same test numbers as the run logged, and the seg / decision loss curves.
    from crackray.report import build_report

    out = tmp_path / "report"
    page = build_report(run.info.run_id, out, tracking_uri=tracker.uri).read_text()
    pixel_table = page.split("### 2 pixel distance")[1].split("#")[0]
    row = [line for line in pixel_table.splitlines() if line.startswith("|")][-1]
    assert [float(v) for v in row.split("|")[1:-1]] == pytest.approx(
        [metrics[f"test/segdec_{k}"] for k in ("precision", "recall", "f1", "threshold")],
        abs=1e-5)
    assert (out / "loss_seg.png").exists() and (out / "loss_dec.png").exists()


@pytest.mark.slow
def test_mixed_supervision_with_frequency_sampling_trains(ray_session, cfd_tiles, tmp_path):
    result, run, tracker = _train(
        cfd_tiles, tmp_path, **{
            "train.epochs": 1, "data.segmented_fraction": 0.5, "data.frequency_sampling": True,
            "data.dilate": 3, "loss.weighted_seg": True, "loss.dynamic_balance": True,
            "train.gradient_adjustment": True, "train.best_model": "both",
        })
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"
    assert math.isfinite(metrics["train/seg"]) and math.isfinite(metrics["train/dec"])
    assert math.isfinite(metrics["test/pixel_f1"]) and math.isfinite(metrics["test/f1"])
    # Frequency sampling keeps every positive and at most as many negatives; rank 0 trains
    # on its half of them (the workers stop together when either runs out).
    totals = read_manifest(cfd_tiles)["totals"]["train"]
    cfg = load_experiment(SEARCH_SPACE, {"data.frequency_sampling": True}).base
    per_worker = epoch_rows(cfg, totals["crack"], totals["no_crack"]) / 2
    assert per_worker - 16 <= metrics["train/samples"] <= per_worker + 1
    assert _artifacts(tracker, run.info.run_id, "masks") == ["masks/val-epoch-0000.png"]
