"""Validation on 2 Ray Train workers counts every sample exactly once, and its metrics equal
an independent single-process computation with scikit-learn (crack = positive class).

Each worker reads its own part of the validation split (`inference.split_batches` with its
rank). The splits here have an odd size (481 real SDNET2018 tiles, or 133 synthetic ones
where ../shared/data is absent) and span several Parquet row groups, so the two parts cannot be
equal and one of them crosses a row-group boundary: padding or dropping rows to even them out,
or a row read twice at a boundary, would show up here. A real 2-worker training run with a
BatchNorm model then checks that the metrics it logs belong to the checkpoint it saves.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from torch import nn

from crackray import checkpoints
from crackray.config import RunConfig
from crackray.data import shards
from crackray.data.prepare import prepare_sdnet2018, prepare_synthetic
from crackray.data.shards import read_split_table, split_files
from crackray.data.splits import VAL
from crackray.engine import EvalOutputs, Objective, evaluate, gather
from crackray.evaluation import split_metrics
from crackray.inference import predict_split, split_batches
from crackray.metrics import classification_metrics
from crackray.train.driver import run_training
from tests.conftest import SDNET

pytestmark = pytest.mark.slow
SYNTHETIC_TILES = 880  # 133 in validation: odd


def validate_per_worker(config: dict) -> None:
    """What `train_fn_per_worker` does for validation, and nothing else; results to files."""
    import ray.train

    cfg = RunConfig.model_validate(config["run"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(0)  # the same weights on both workers, as after DDP's broadcast
    model = _model(cfg)
    objective = Objective(cfg, 1.0, segmentation=False)
    batches = split_batches(cfg, VAL, 16, torch.device("cpu"), rank=rank,
                            world_size=context.get_world_size())
    local = evaluate(model, batches, objective)
    everything = gather(local)
    out = Path(config["out"])
    (out / f"rank-{rank}.json").write_text(json.dumps({"paths": local.paths.tolist()}))
    if rank == 0:
        np.savez(out / "gathered.npz", probs=everything.probs, targets=everything.targets,
                 paths=everything.paths.astype(str), loss_sum=everything.loss_sum)
        torch.save(model.state_dict(), out / "model.pt")


def _model(cfg: RunConfig):
    from crackray.models import create_model

    return create_model(cfg.model.name)


@pytest.fixture(scope="module")
def sdnet_val(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "split"
    with pytest.MonkeyPatch.context() as patch:  # the parts start and end inside row groups
        patch.setattr(shards, "ROW_GROUP_SIZE", 50)
        if SDNET.exists():
            prepare_sdnet2018(SDNET, out, seed=0)
        else:  # CI without ../shared: synthetic tiles, 133 in validation
            prepare_synthetic(out, n=SYNTHETIC_TILES, seed=0, image_size=64)
    cfg = RunConfig.model_validate({"data": {"path": str(out), "image_size": 32},
                                    "model": {"name": "test_tiny"}})
    return cfg, read_split_table(out, VAL, ["path", "label"]).to_pydict()


def test_two_worker_validation_counts_each_sample_once_and_matches_sklearn(
        ray_session, sdnet_val, tmp_path):
    import ray.cloudpickle
    import ray.train
    import ray.train.torch

    # The workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg, table = sdnet_val
    assert len(table["path"]) % 2 == 1  # odd: the two parts must differ in size
    assert sum(pq.ParquetFile(f).num_row_groups for f in split_files(cfg.data.path, VAL)) > 2
    trainer = ray.train.torch.TorchTrainer(
        validate_per_worker,
        train_loop_config={"run": cfg.model_dump(), "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="ddp-metrics", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()

    # Every path of the split exactly once, in the gathered set and across the two shards.
    gathered = np.load(tmp_path / "gathered.npz", allow_pickle=False)
    paths = gathered["paths"].tolist()
    assert Counter(paths) == Counter(table["path"])
    shards = [json.loads((tmp_path / f"rank-{r}.json").read_text())["paths"] for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(table["path"])
    assert not set(shards[0]) & set(shards[1])
    assert abs(len(shards[0]) - len(shards[1])) == 1
    truth = dict(zip(table["path"], table["label"], strict=True))
    probs, targets = gathered["probs"], gathered["targets"]
    assert targets.tolist() == [truth[p] for p in paths]

    # An independent single process predicts the same probabilities for the same tiles.
    model = _model(cfg)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    single = predict_split(model, cfg, VAL)
    by_path = dict(zip(single.paths.tolist(), single.probs.tolist(), strict=True))
    np.testing.assert_allclose(probs, [by_path[p] for p in paths], rtol=1e-4, atol=1e-6)

    # crackray's metrics on the gathered predictions equal scikit-learn's, crack positive.
    # Random weights give probabilities close together: threshold at their median so that
    # both classes are predicted and precision / recall are not degenerate.
    threshold = float(np.median(probs))
    ours = classification_metrics(probs, targets, threshold=threshold)
    preds = (probs >= threshold).astype(int)
    assert 0 < preds.sum() < len(preds)
    assert ours["samples"] == len(table["path"])
    assert ours["positives"] == sum(table["label"])
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(targets, preds))
    assert ours["precision"] == pytest.approx(skm.precision_score(targets, preds, pos_label=1))
    assert ours["recall"] == pytest.approx(skm.recall_score(targets, preds, pos_label=1))
    assert ours["f1"] == pytest.approx(skm.f1_score(targets, preds, pos_label=1))
    assert ours["auroc"] == pytest.approx(skm.roc_auc_score(targets, probs), abs=1e-6)
    (tn, fp), (fn, tp) = skm.confusion_matrix(targets, preds, labels=[0, 1])
    assert (ours["tn"], ours["fp"], ours["fn"], ours["tp"]) == (tn, fp, fn, tp)

    # val/loss is the mean over all samples, not a mean of per-worker means.
    logits = torch.logit(torch.tensor(probs, dtype=torch.float64))
    expected_loss = F.binary_cross_entropy_with_logits(
        logits, torch.tensor(targets, dtype=torch.float64)).item()
    val = split_metrics(EvalOutputs(probs=probs, targets=targets,
                                    loss_sum=float(gathered["loss_sum"])), VAL)
    assert val["val/loss"] == pytest.approx(expected_loss, rel=1e-4)


@pytest.fixture(scope="module")
def batchnorm_run(ray_session, tmp_path_factory):
    """A real 2-worker `crackray train` run of a BatchNorm model on the session's local Ray,
    and the class names of the actors it started."""
    import ray._private.state

    folder = tmp_path_factory.mktemp("bn")
    prepare_synthetic(folder / "data", n=SYNTHETIC_TILES, seed=0, image_size=32)
    cfg = RunConfig.model_validate({
        "data": {"path": str(folder / "data"), "image_size": 32},
        "model": {"name": "simple_cnn"},
        "optim": {"lr": 1e-2, "scheduler": "none"},
        "train": {"epochs": 1, "workers": 2, "batch_size": 16},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
    })
    before = set(ray._private.state.actors())
    result = run_training(cfg, storage_path=str(folder / "ray_results"), experiment="bn")
    started = Counter(info["ActorClassName"]
                      for actor, info in ray._private.state.actors().items()
                      if actor not in before)
    return result, started


def test_a_training_run_starts_no_actor_it_does_not_need(batchnorm_run):
    """Every actor process costs a trial seconds of start-up (README "Performance"): the
    workers read their own data, so no Ray Data split coordinator and no dataset manager; the
    local Ray is one node nobody drains, so no preemption watcher."""
    _, started = batchnorm_run
    assert started["RayTrainWorker"] == 2 and started["TrainController"] == 1, started
    for unneeded in ("SplitCoordinator", "DatasetManager", "PreemptionWatcher"):
        assert started[unneeded] == 0, started


def test_two_worker_training_logs_the_metrics_of_the_checkpoint_it_saves(batchnorm_run):
    """BatchNorm: each worker's last training forward moves its own running statistics, so
    unless rank 0's buffers reach every rank before evaluation, the two halves of the
    validation split are scored by two different models, neither of them the saved one."""
    result, _ = batchnorm_run
    model, saved_cfg, payload = checkpoints.build_model_from_file(result.best_model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    single = predict_split(model, saved_cfg, VAL)  # one process, no Ray
    samples = len(single.targets)
    assert samples % 2 == 1  # odd: the workers' parts differ in size
    logged = result.history[payload["epoch"]]
    assert logged["val/samples"] == samples
    assert logged["val/loss"] == pytest.approx(single.loss_sum / samples, rel=1e-5)
    assert logged["val/ap"] == pytest.approx(
        skm.average_precision_score(single.targets, single.probs), abs=1e-6)
    preds = (single.probs >= 0.5).astype(int)
    assert logged["val/recall"] == pytest.approx(
        skm.recall_score(single.targets, preds, zero_division=0), abs=1e-6)
