"""Benchmarks: both sides see the same pixels; every `crackray bench` subcommand runs on tiny
synthetic data and ends with one JSON line. No timing assertions: the CI machine is shared."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch

from crackray.bench import baseline, common, ingest, memory
from crackray.bench.gpu import bench_gpu
from crackray.data.images import decode_rgb
from crackray.data.prepare import prepare_synthetic
from crackray.data.shards import read_split_table


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "syn"
    prepare_synthetic(out, n=80, seed=3)
    return out


def test_baseline_dataset_decodes_like_the_pipeline(tiny_data):
    dataset = baseline.ShardDataset(tiny_data, "train", 32, augment_strength=0.0)
    table = read_split_table(tiny_data, "train", ["image", "label"])
    batch = dataset[[2, 0]]
    expected = np.stack([decode_rgb(table.column("image")[i].as_py(), 32) for i in (2, 0)])
    np.testing.assert_array_equal(batch["image"], expected)
    np.testing.assert_array_equal(batch["label"], table.column("label").to_numpy()[[2, 0]])


def test_plain_batches_cover_the_split_once_as_model_input(tiny_data):
    dataset = baseline.ShardDataset(tiny_data, "train", 32, augment_strength=1.0)
    batches = list(baseline.plain_batches(baseline.plain_loader(dataset, 16, 0), "cpu"))
    assert sum(len(b["label"]) for b in batches) == len(dataset)
    assert batches[0]["image"].shape == (16, 3, 32, 32)
    assert batches[0]["image"].dtype.is_floating_point


def test_peak_memory_sees_this_process():
    me = psutil.Process()
    before = me.memory_full_info().pss
    with memory.PeakMemory(lambda: [me], interval_s=0.01) as peak:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB touched while polling
        block.sum()
        after = me.memory_full_info().pss
    assert peak.peak_bytes >= after >= before + 60 * 2**20


def _wait_for(started, stop) -> None:
    started.set()
    stop.wait(3600)


def test_sides_split_forked_workers_from_other_child_processes():
    """A forked child shares this command line (a DataLoader worker); a new interpreter
    with another one stands for Ray's processes; a process multiprocessing spawned (where
    `bench train` plays each plain round) belongs to neither side."""
    fork = multiprocessing.get_context("fork")
    started, stop = fork.Event(), fork.Event()
    forked = fork.Process(target=_wait_for, args=(started, stop))
    forked.start()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    spawn = multiprocessing.get_context("spawn")
    spawned_started, spawned_stop = spawn.Event(), spawn.Event()
    spawned = spawn.Process(target=_wait_for, args=(spawned_started, spawned_stop))
    spawned.start()
    try:
        started.wait(60)
        spawned_started.wait(60)
        plain = {p.pid for p in memory.dataloader_workers()}
        ray = {p.pid for p in memory.ray_side()}
        assert {os.getpid(), forked.pid} <= plain and other.pid not in plain
        assert {os.getpid(), other.pid} <= ray and forked.pid not in ray
        assert spawned.pid not in plain | ray
        # A process that has gone counts 0 bytes instead of failing the sampler.
        gone = psutil.Process(other.pid)
        other.kill()
        other.wait()
        assert memory.pss_bytes(gone) == 0
    finally:
        stop.set()
        spawned_stop.set()
        forked.join()
        spawned.join()
        if other.poll() is None:
            other.kill()


def test_cpu_seconds_count_what_the_processes_spent():
    me = psutil.Process()
    before = memory.cpu_seconds([me])
    sum(i * i for i in range(3_000_000))  # ~0.2 s of CPU in this process
    after = memory.cpu_seconds([me])
    times = me.cpu_times()
    assert after[me.pid] <= times.user + times.system
    assert memory.cpu_used(before, after) == pytest.approx(after[me.pid] - before[me.pid])
    assert memory.cpu_used(before, after) > 0.05
    # A process that started between the snapshots counts whole.
    assert memory.cpu_used({1: 2.0}, {1: 5.0, 7: 1.5}) == pytest.approx(4.5)


def test_sides_alternate_so_neither_always_runs_first():
    order = list(common.alternating(3))
    assert [side for _, side in order] == [common.CROSS, common.PLAIN, common.PLAIN,
                                           common.CROSS, common.CROSS, common.PLAIN]


def test_summary_rates_are_total_images_over_total_seconds():
    rounds = [{"side": common.CROSS, "images": 100, "seconds": 2.0},
              {"side": common.PLAIN, "images": 100, "seconds": 4.0},
              {"side": common.CROSS, "images": 300, "seconds": 2.0},
              {"side": common.PLAIN, "images": 60, "seconds": 1.0}]
    out = common.summary("ingest", rounds, {}, {common.CROSS: 10.0, common.PLAIN: 20.0})
    # Not the mean of per-round rates (50 and 150 -> 100): 400 images in 4 s.
    assert out["crackray_images_per_s"] == 100.0
    assert out["baseline_images_per_s"] == 32.0  # 160 images in 5 s
    assert out["ratio"] == pytest.approx(100.0 / 32.0, abs=1e-3)


def test_ceilings_are_one_process_rates_times_the_cores(tiny_data):
    limits = common.ceilings(tiny_data, 32, augment=1.0, sample=16, batch_size=4)
    for key in ("decode_resize", "decode", "transform", "model_input"):
        one = limits[f"{key}_images_per_s_one_process"]
        assert one > 0
        assert limits[f"{key}_limit_images_per_s"] == pytest.approx(one * common.cores(), abs=0.2)
    # Without the consumer's batch size there is no model-input ceiling (the GPU benchmark's
    # consumer is the GPU).
    assert "model_input_limit_images_per_s" not in common.ceilings(tiny_data, 32, 1.0, sample=8)


def test_a_ceiling_is_all_its_passes_images_over_all_their_cpu_time(tiny_data, monkeypatch):
    """Not the best pass: the passes are spread between a benchmark's rounds, and the ceiling
    must see the same mixture of the machine's fast and slow moments as the rounds."""
    ceiling = common.Ceilings(tiny_data, 32, augment=1.0, sample=16, batch_size=4)
    images = min(16, read_split_table(tiny_data, "train", ["label"]).num_rows)
    clock = {"now": 0.0, "calls": 0, "step": 0.5}

    def process_time() -> float:  # every second call (a pass's end) is `step` later
        clock["calls"] += 1
        if clock["calls"] % 2 == 0:
            clock["now"] += clock["step"]
        return clock["now"]

    monkeypatch.setattr(common.time, "process_time", process_time)
    ceiling.measure()
    clock["step"] = 1.5
    figures = ceiling.measure().figures()
    for key in ("decode_resize", "decode", "transform", "model_input"):
        # 2 passes of `images` in 0.5 + 1.5 CPU-seconds (the best pass alone: images / 0.5)
        assert figures[f"{key}_images_per_s_one_process"] == pytest.approx(images / 1.0)
        assert figures[f"{key}_limit_images_per_s"] == pytest.approx(
            images / 1.0 * common.cores())


def test_ceiling_decode_is_the_training_crop(tiny_data):
    """The decode ceiling times the crop the training path takes, not the resize."""
    data = read_split_table(tiny_data, "train", ["image"]).column("image")[0].as_py()
    full = decode_rgb(data)
    size = full.shape[0] - 4  # within the crop slack: cropped, at offset (0, 0)
    np.testing.assert_array_equal(common._decode_only(data, size), full[:size, :size])


def test_ingest_memory_is_read_in_a_fresh_process_per_side(tiny_data):
    """Each side's peak memory comes from a process that ran nothing else: not this one, and
    not the other side's (their figures used to carry each other's leftovers)."""
    assert common.in_fresh_process(os.getpid) != os.getpid()
    cfg = common.bench_config(tiny_data, image_size=32, batch_size=8)
    peak = common.in_fresh_process(ingest.peak_memory, common.PLAIN, cfg, None)
    # At least a Python process with torch loaded (~100 MiB PSS), at most a few GiB.
    assert 50 < peak < 4096


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
    for limit in ("decode_resize", "decode", "transform", "model_input"):
        assert out[f"crackray_share_of_{limit}_limit"] == pytest.approx(
            out["crackray_images_per_s"] / out[f"{limit}_limit_images_per_s"], abs=1e-3)
    for side in ("crackray", "baseline"):
        rounds = [r for r in out["rounds"] if r["side"] == side]
        assert out[f"{side}_images_per_cpu_s"] == pytest.approx(
            sum(r["images"] for r in rounds) / sum(r["cpu_seconds"] for r in rounds), rel=0.01)
    n_train = read_split_table(tiny_data, "train", ["label"]).num_rows
    assert {r["images"] for r in out["rounds"]} == {n_train}  # each side saw the whole split


@pytest.mark.slow
def test_bench_train_json(cli, tiny_data):
    out = _last_json(cli("bench", "train", "--data", tiny_data, "--model", "test_tiny",
                         "--image-size", "32", "--epochs", "1", "--repeats", "1",
                         "--limit", "32", "--threads", "2", "--json"))
    _assert_comparison(out)
    assert {r["images"] for r in out["rounds"]} == {32}
    # The worker reserves 1 CPU (Ray's default: 1 torch thread); --threads 2 must reach it.
    assert out["settings"]["ray_worker_cpus"] == 1.0
    assert [r["torch_threads"] for r in out["rounds"] if r["side"] == "crackray"] == [2]


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
    # The profile comes from both workers' timestamps (the bench's worker hook reached them);
    # a job's first trial starts cold.
    profile = out["profile"]
    assert profile["warm_workers"] == "0/2"
    assert 0 < profile["start_to_loop_s"] < out["trial_wall_s"]
    assert 0 < profile["loop_to_epoch0_trained_s"] < out["trial_wall_s"]


def test_bench_rejects_a_folder_without_shards(cli, tmp_path):
    result = cli("bench", "ingest", "--data", tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_bench_says_why_it_skipped(cli, tiny_data):
    assert "no CUDA device" in bench_gpu(tiny_data)["skipped"]
    out = _last_json(cli("bench", "gpu", "--data", tiny_data, "--json"))
    assert out["benchmark"] == "gpu" and "no CUDA device" in out["skipped"]
