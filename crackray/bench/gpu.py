"""`crackray bench gpu`: ResNet-18 (by default) at 224 px, bf16 autocast, channels-last, fed by
the Ray Data pipeline, against the same model on synthetic batches already on the GPU; with
the host's decode ceiling and, optionally, GPU-side JPEG decoding (nvJPEG) as the alternative
when the CPUs cannot keep the GPU busy. Skips with a reason where torch sees no CUDA device."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from crackray.bench.common import (
    bench_config,
    ceilings,
    cores,
    start_ray,
    steady,
    stop_ray,
    training_parts,
)
from crackray.bench.gpu_utilisation import GpuUtilisation
from crackray.config import RunConfig


def _gpu_config(data, model: str, image_size: int, batch_size: int, epochs: int) -> RunConfig:
    cfg = bench_config(data, image_size=image_size, batch_size=batch_size, model=model,
                       epochs=epochs, cpus_per_worker=1.0)
    return cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"use_gpu": True, "bf16": True})})


def _model_only(cfg: RunConfig, steps: int) -> dict:
    """Training images/s on one synthetic batch already on the GPU: the model's own limit."""
    from crackray.engine import train_one_epoch

    device = torch.device("cuda")
    model, objective, optimizer = training_parts(cfg, device)
    model = model.to(memory_format=torch.channels_last)
    size, n = cfg.data.image_size, cfg.train.batch_size
    batch = {"image": torch.randn(n, 3, size, size, device=device)
             .contiguous(memory_format=torch.channels_last),
             "label": (torch.rand(n, device=device) < 0.5).float()}
    train_one_epoch(model, [batch] * 5, objective, optimizer, epoch=0, epochs=1, bf16=True,
                    device=device)  # warm-up: cuDNN autotuning, allocator
    torch.cuda.synchronize()
    with GpuUtilisation() as utilisation:  # .item() per step synchronises
        stats = train_one_epoch(model, [batch] * steps, objective, optimizer, epoch=0, epochs=1,
                                bf16=True, device=device)
    return {"images_per_s": round(stats["images_per_s"], 1),
            "gpu_utilisation_pct": utilisation.mean}


def _gpu_decode_rate(data: str | Path, image_size: int, sample: int = 512) -> dict:
    """nvJPEG: images/s of decoding a batch of the stored JPEG tiles on the GPU and bringing
    them to `image_size` (a crop where the tile is large enough, as the CPU training path)."""
    import torchvision.io

    from crackray.data.shards import read_split_table

    images = read_split_table(data, "train", ["image"]).column("image").to_pylist()
    jpegs = [b for b in images if b[:2] == b"\xff\xd8"][:sample]  # PNG tiles stay on the CPU
    if not jpegs:
        return {"gpu_decode_skipped": "no JPEG tiles in the training split"}
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]

    def to_size(image: torch.Tensor) -> torch.Tensor:
        if min(image.shape[1:]) >= image_size:
            return image[:, :image_size, :image_size]
        return torch.nn.functional.interpolate(image[None].float(), size=(image_size,) * 2,
                                               mode="bilinear", antialias=True)[0].byte()

    def run() -> None:
        decoded = torchvision.io.decode_jpeg(encoded, device="cuda")
        torch.stack([to_size(d) for d in decoded])
        torch.cuda.synchronize()

    run()  # warm-up: nvJPEG handles
    start = time.perf_counter()
    run()
    return {"gpu_decode_images_per_s": round(len(jpegs) / (time.perf_counter() - start), 1)}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 1) if values else None


def bench_gpu(data: str | Path, *, model: str = "resnet18", image_size: int = 224,
              batch_size: int = 128, epochs: int = 3, steps: int = 30, limit: int | None = None,
              gpu_decode: bool = True) -> dict:
    if not torch.cuda.is_available():
        return {"benchmark": "gpu",
                "skipped": f"no CUDA device (torch {torch.__version__} sees none)",
                "settings": {"cores": cores()}}
    cfg = _gpu_config(data, model, image_size, batch_size, epochs)
    model_only = _model_only(cfg, steps)
    started = start_ray()
    try:
        with tempfile.TemporaryDirectory(prefix="crackray-bench-gpu-") as storage:
            from crackray.bench.train import ray_fit

            fed = steady(ray_fit(cfg, limit, storage, use_gpu=True))
    finally:
        stop_ray(started)
    fed_rate = sum(e["images"] for e in fed) / max(sum(e["seconds"] for e in fed), 1e-9)
    limits = ceilings(cfg.data.path, image_size, cfg.data.augment)
    return {
        "benchmark": "gpu",
        "device": torch.cuda.get_device_name(0),
        "model_only_images_per_s": model_only["images_per_s"],
        "model_only_gpu_utilisation_pct": model_only["gpu_utilisation_pct"],
        "pipeline_fed_images_per_s": round(fed_rate, 1),
        "pipeline_fed_gpu_utilisation_pct": _mean([e["gpu_utilisation_pct"] for e in fed]),
        "fed_over_model_only": round(fed_rate / model_only["images_per_s"], 3),
        **limits,
        **(_gpu_decode_rate(cfg.data.path, image_size) if gpu_decode else {}),
        "settings": {"data": cfg.data.path, "model": model, "image_size": image_size,
                     "batch_size": batch_size, "epochs": epochs, "steps": steps,
                     "limit": limit, "bf16": True, "channels_last": True, "cores": cores()},
    }
