"""Throughput benchmarks: crackray's Ray machinery side by side with plain PyTorch.

Both sides of each comparison call the same functions (`batches.prepare_batch` for decode and
augmentation, `transforms.to_model_input`, `engine.train_one_epoch`), so a ratio measures only
the machinery around them. The sides alternate round by round (A B, B A, ...) so that a shared,
noisy CPU slows both alike; every round is kept in the result so the noise can be seen.

One benchmark a module: `ingest`, `train`, `trial`, `gpu`; `baseline` is the plain-PyTorch
side, `common` what they share, `memory` the psutil sampling, `report` the printed summary.
"""

from crackray.bench.gpu import bench_gpu
from crackray.bench.ingest import bench_ingest
from crackray.bench.report import describe
from crackray.bench.train import bench_train
from crackray.bench.trial import bench_trial

__all__ = ["bench_gpu", "bench_ingest", "bench_train", "bench_trial", "describe"]
