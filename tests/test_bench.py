"""Benchmarks: both sides see the same pixels; every `crackray bench` subcommand runs on tiny
synthetic data and ends with one JSON line. No timing assertions: the CI machine is shared."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from crackray import bench
from crackray.data.images import decode_rgb
from crackray.data.prepare import prepare_synthetic
from crackray.data.shards import read_split_table


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "syn"
    prepare_synthetic(out, n=80, seed=3)
    return out


def test_baseline_dataset_decodes_like_the_pipeline(tiny_data):
    dataset = bench.ShardDataset(tiny_data, "train", 32, augment_strength=0.0)
    table = read_split_table(tiny_data, "train", ["image", "label"])
    batch = dataset[[2, 0]]
    expected = np.stack([decode_rgb(table.column("image")[i].as_py(), 32) for i in (2, 0)])
    np.testing.assert_array_equal(batch["image"], expected)
    np.testing.assert_array_equal(batch["label"], table.column("label").to_numpy()[[2, 0]])


def test_plain_batches_cover_the_split_once_as_model_input(tiny_data):
    dataset = bench.ShardDataset(tiny_data, "train", 32, augment_strength=1.0)
    batches = list(bench.plain_batches(bench.plain_loader(dataset, 16, 0), "cpu"))
    assert sum(len(b["label"]) for b in batches) == len(dataset)
    assert batches[0]["image"].shape == (16, 3, 32, 32)
    assert batches[0]["image"].dtype.is_floating_point


def test_peak_memory_sees_this_process():
    with bench.PeakMemory(lambda: [os.getpid()], interval_s=0.01) as memory:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB touched while polling
        block.sum()
    assert memory.peak_mib > 64


def test_sides_alternate_so_neither_always_runs_first():
    order = list(bench._alternating(3))
    assert [side for _, side in order] == [bench.CROSS, bench.PLAIN, bench.PLAIN, bench.CROSS,
                                           bench.CROSS, bench.PLAIN]


def _last_json(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_comparison(out: dict) -> None:
    for key in ("crackray_images_per_s", "baseline_images_per_s", "ratio",
                "crackray_peak_pss_mib", "baseline_peak_pss_mib"):
        assert out[key] > 0, key
    assert out["ratio"] == pytest.approx(
        out["crackray_images_per_s"] / out["baseline_images_per_s"], rel=0.01, abs=1e-3)


@pytest.mark.slow
def test_bench_ingest_json(cli, tiny_data):
    out = _last_json(cli("bench", "ingest", "--data", tiny_data, "--image-size", "32",
                         "--batch-size", "16", "--repeats", "1", "--json"))
    _assert_comparison(out)
    assert out["decode_limit_images_per_s"] > 0
    n_train = read_split_table(tiny_data, "train", ["label"]).num_rows
    assert {r["images"] for r in out["rounds"]} == {n_train}  # each side saw the whole split


@pytest.mark.slow
def test_bench_train_json(cli, tiny_data):
    out = _last_json(cli("bench", "train", "--data", tiny_data, "--model", "test_tiny",
                         "--image-size", "32", "--epochs", "1", "--repeats", "1",
                         "--limit", "32", "--threads", "2", "--gpu", "--json"))
    _assert_comparison(out)
    assert {r["images"] for r in out["rounds"]} == {32}
    # The worker reserves 1 CPU (Ray's default: 1 torch thread); --threads 2 must reach it.
    assert out["settings"]["ray_worker_cpus"] == 1.0
    assert [r["torch_threads"] for r in out["rounds"] if r["side"] == "crackray"] == [2]
    assert out["gpu"].get("skipped") or out["gpu"]["model_only_images_per_s"] > 0


@pytest.mark.slow
def test_bench_trial_json(cli, tmp_path):
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(
        "base:\n"
        "  data: {path: data/demo, synthetic_if_missing: true, synthetic_n: 60, image_size: 32}\n"
        "  model: {name: test_tiny}\n"
        "  train: {epochs: 1, batch_size: 16}\n"
        "tune: {workers_per_trial: 2, cpus_per_worker: 0.5}\n"
    )
    out = _last_json(cli("bench", "trial", experiment, "--trials", "1", "--workdir",
                         tmp_path / "work", "--json"))
    assert out["trial_wall_s"] > 0 and out["plain_loop_s"] > 0
    assert out["fixed_cost_s"] == pytest.approx(out["trial_wall_s"] - out["plain_loop_s"], abs=0.02)
    assert out["mlflow_child_runs"] == 1


def test_bench_rejects_a_folder_without_shards(cli, tmp_path):
    result = cli("bench", "ingest", "--data", tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error:")
