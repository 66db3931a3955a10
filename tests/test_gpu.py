"""The GPU path: one GPU per Train worker, bf16 autocast, channels-last batches and weights.
Skipped where torch sees no CUDA device (the CPU wheel, a laptop, CI without GPUs)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason=f"needs a CUDA GPU (torch {torch.__version__} sees none)"),
]


def test_bf16_channels_last_step_on_gpu():
    from crackray.config import RunConfig
    from crackray.data.transforms import to_model_input
    from crackray.engine import Objective, autocast_for
    from crackray.models import create_model

    device = torch.device("cuda")
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8).numpy()
    batch = to_model_input(images, device)
    assert batch.is_cuda and batch.is_contiguous(memory_format=torch.channels_last)

    model = create_model("test_tiny", image_size=32).to(device, memory_format=torch.channels_last)
    objective = Objective(RunConfig(), 1.0, False)
    labels = torch.tensor([0, 1] * 4, dtype=torch.float32, device=device)
    before = [p.detach().clone() for p in model.parameters()]
    with autocast_for(device, bf16=True):
        logits = model(batch)
        loss, _ = objective(logits, {"label": labels}, 0, 1)
    assert logits.dtype == torch.bfloat16  # autocast really ran the model in bf16
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.slow
def test_one_epoch_training_on_gpu(cli, tmp_path):
    result = cli("train", REPO / "search_spaces" / "quickstart.yaml",
                 "--set", f"data.path={tmp_path / 'data'}", "--set", "data.synthetic_n=200",
                 "--set", "train.epochs=1", "--set", "train.workers=1",
                 "--set", "train.use_gpu=true", "--set", "train.bf16=true",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "epochs run: 1" in result.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = result.stdout.split("MLflow run ")[1].split()[0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.use_gpu"] == "True"
    assert 0.0 <= run.data.metrics["val/f1"] <= 1.0


@pytest.mark.slow
def test_gpu_bench_compares_pipeline_fed_with_synthetic(cli, tmp_path):
    import json

    from crackray.data.prepare import prepare_synthetic

    prepare_synthetic(tmp_path / "syn", n=120, seed=2)
    result = cli("bench", "gpu", "--data", tmp_path / "syn", "--model", "test_tiny",
                 "--image-size", "32", "--batch-size", "16", "--epochs", "2", "--steps", "5",
                 "--json", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["model_only_images_per_s"] > 0 and out["pipeline_fed_images_per_s"] > 0
    assert out["fed_over_model_only"] == pytest.approx(
        out["pipeline_fed_images_per_s"] / out["model_only_images_per_s"], rel=0.01)
    assert out["gpu_decode_images_per_s"] > 0
    assert out["decode_limit_images_per_s"] > 0
